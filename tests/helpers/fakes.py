"""Fake secrets generated at run time: never a literal real-looking secret in the repo.

Each generator returns a fresh random value in the shape of a real credential, so the
scanner, the audit guard and the tests that grep for leaks see realistic input. Tests keep
the values they emitted (see `emitted`) and grep every artifact for all of them.
"""
from __future__ import annotations

import re
import secrets
import string

emitted: list[str] = []


def _keep(value: str) -> str:
    emitted.append(value)
    return value


def _rand(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def daemon_token() -> str:
    """In the shape of sandbox/daemon/tokens.py: sbxd_<12 hex>_<43 urlsafe>."""
    return _keep(f"sbxd_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}")


def aws_access_key_id() -> str:
    return _keep("AKIA" + _rand(string.ascii_uppercase + string.digits, 16))


def github_token() -> str:
    return _keep("ghp_" + _rand(string.ascii_letters + string.digits, 36))


def private_key_block() -> str:
    body = "\n".join(_rand(string.ascii_letters + string.digits + "+/", 64) for _ in range(4))
    return _keep(f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----")


def password() -> str:
    return _keep(_rand(string.ascii_letters + string.digits, 24))


# ---------------------------------------------------------------------------------------------
# Scanner fakes (bytes): every provider format of policies/scanner/default.toml, with valid
# checksums where the format has them (GitHub/npm CRC32, Luhn) so validators accept them.
# Prefixes are assembled from parts so no real-looking secret is ever written in this file.
# FAKES maps a scanner rule id to a generator; HARD_NEGATIVES to near-misses it must not report.

import base64
import json
import random
import string
import zlib

_rng = random.SystemRandom()
UPPER, LOWER, DIGITS = string.ascii_uppercase, string.ascii_lowercase, string.digits
B62 = DIGITS + UPPER + LOWER
B64URL = UPPER + LOWER + DIGITS + "-_"


def rand(alphabet: str, n: int) -> str:
    """n random characters, always mixing upper, lower and digits when the alphabet has them,
    and never spelling a placeholder word by chance ("XXXX", "fAKe": the scanner rightly drops
    those, which made about 1 in 5000 generated fakes a false test failure)."""
    from sandbox.scan.validators import is_placeholder
    while True:
        s = "".join(_rng.choice(alphabet) for _ in range(n))
        classes = [c for c in (UPPER, LOWER, DIGITS) if set(c) & set(alphabet)]
        if n < 8 or (all(set(s) & set(c) for c in classes) and not is_placeholder(s.encode())):
            return s


def _b62(n: int) -> str:
    out = ""
    while n:
        n, r = divmod(n, 62)
        out = B62[r] + out
    return out.rjust(6, "0")


def crc_token(prefix: str, valid: bool = True) -> bytes:
    body = rand(B62, 30)
    check = _b62(zlib.crc32(body.encode()) & 0xFFFFFFFF)
    if not valid:
        check = check[:-1] + ("A" if check[-1] != "A" else "B")
    return (prefix + body + check).encode()


def aws_key_id() -> bytes:
    return ("AK" + "IA" + rand(UPPER + "234567", 16)).encode()


def aws_secret_line() -> bytes:
    return b"aws_secret_access_key = " + rand(UPPER + LOWER + DIGITS + "/+", 40).encode()


def gh_token(kind: str = "p", valid: bool = True) -> bytes:
    return crc_token("g" + "h" + kind + "_", valid)


def github_fine_grained() -> bytes:
    return ("github" + "_pat_" + rand(B62, 22) + "_" + rand(B62, 59)).encode()


def gitlab_token() -> bytes:
    return ("gl" + "pat-" + rand(B62 + "_-", 20)).encode()


def npm_token(valid: bool = True) -> bytes:
    return crc_token("np" + "m_", valid)


def pypi_token() -> bytes:
    return ("py" + "pi-" + "AgEIcHlwaS5vcmc" + rand(B64URL, 70)).encode()


def slack_token() -> bytes:
    return ("xo" + "xb-" + rand(DIGITS, 12) + "-" + rand(DIGITS, 13) + "-" + rand(B62, 24)).encode()


def slack_webhook() -> bytes:
    return ("https://hooks." + "slack.com/services/T" + rand(UPPER + DIGITS, 8) + "/B"
            + rand(UPPER + DIGITS, 10) + "/" + rand(B62, 24)).encode()


def stripe_key() -> bytes:
    return ("sk" + "_live_" + rand(B62, 24)).encode()


def google_api_key() -> bytes:
    return ("AI" + "za" + rand(B62 + "_-", 35)).encode()


def openai_key() -> bytes:
    return ("sk-" + "proj-" + rand(B62, 30) + "T3Blbk" + "FJ" + rand(B62, 30)).encode()


def openai_project_key() -> bytes:
    return ("sk-" + "proj-" + rand(B62 + "_-", 64)).encode()


def anthropic_key() -> bytes:
    return ("sk-" + "ant-" + "api03-" + rand(B62 + "_-", 93) + "AA").encode()


def azure_connection_string() -> bytes:
    key = base64.b64encode(_rng.randbytes(64)).decode()
    return ("DefaultEndpointsProtocol=https;AccountName=" + rand(LOWER, 10)
            + ";AccountKey=" + key + ";EndpointSuffix=core.windows.net").encode()


def azure_shared_access_key() -> bytes:
    return ("Endpoint=sb://" + rand(LOWER, 8) + ".servicebus.windows.net/;SharedAccessKeyName=Root;"
            "SharedAccessKey=" + base64.b64encode(_rng.randbytes(32)).decode()).encode()


def twilio_api_key() -> bytes:
    return ("S" + "K" + rand("0123456789abcdef", 32)).encode()


def twilio_auth_token() -> bytes:
    return ("TWILIO_AUTH_TOKEN=" + rand("0123456789abcdef", 32)).encode()


def sendgrid_key() -> bytes:
    return ("S" + "G." + rand(B62 + "_-", 22) + "." + rand(B62 + "_-", 43)).encode()


def pem_private_key(label: str = "RSA") -> bytes:
    body = base64.encodebytes(_rng.randbytes(600)).decode()
    dash = "-" * 5
    return (f"{dash}BEGIN {label} PRIVATE KEY{dash}\n{body}{dash}END {label} PRIVATE KEY{dash}\n").encode()


def openssh_private_key() -> bytes:
    return pem_private_key("OPENSSH")


def jwt() -> bytes:
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=")
    header = part({"alg": "HS256", "typ": "JWT"})
    payload = part({"sub": rand(DIGITS, 10), "name": rand(LOWER, 8), "iat": _rng.randint(10**9, 2 * 10**9)})
    sig = base64.urlsafe_b64encode(_rng.randbytes(32)).rstrip(b"=")
    return header + b"." + payload + b"." + sig


def gcp_service_account() -> bytes:
    return json.dumps({"type": "service_account", "project_id": rand(LOWER, 10),
                       "private_key_id": rand("0123456789abcdef", 40),
                       "private_key": pem_private_key("").decode().replace("BEGIN  ", "BEGIN ")
                       .replace("END  ", "END "),
                       "client_email": rand(LOWER, 8) + "@proj.iam.gserviceaccount.com"},
                      indent=2).encode()


def url_with_password() -> bytes:
    return ("postgres://" + rand(LOWER, 6) + ":" + rand(B62, 16) + "@db." + rand(LOWER, 6) + ".internal:5432/app").encode()


def generic_assignment() -> bytes:
    while True:
        value = rand(B62, 6) + rand(B62 + "!#%", 14)
        # "%41" in the value would make it percent-encoded text (found, rightly, through the
        # percent decoder, so the encoding chain would not be the one a test expects)
        if not re.search(r"%[0-9A-Fa-f]{2}", value):
            return ("DB_PASSWORD=" + value).encode()


def luhn_digit(partial: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def card_number(sep: str = "", valid: bool = True, prefix: str = "4") -> bytes:
    while True:
        partial = prefix + rand(DIGITS, 15 - len(prefix))
        if len(set(partial)) > 4:
            break
    check = luhn_digit(partial)
    if not valid:
        check = str((int(check) + 1) % 10)
    digits = partial + check
    return sep.join(digits[i:i + 4] for i in range(0, 16, 4)).encode()


def ssn() -> bytes:
    area = _rng.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{_rng.randint(1, 99):02d}-{_rng.randint(1, 9999):04d}".encode()


def email() -> bytes:
    return (rand(LOWER, 7) + "." + rand(LOWER, 6) + "@" + rand(LOWER, 8) + "-corp.com").encode()


def phone_e164() -> bytes:
    return ("+44" + "7" + rand(DIGITS, 9)).encode()


def phone_nanp() -> bytes:
    area = str(_rng.randint(2, 9)) + str(_rng.randint(0, 9)) + str(_rng.randint(2, 9))
    exch = str(_rng.randint(2, 9)) + str(_rng.randint(0, 9)) + str(_rng.randint(2, 9))
    return f"({area}) {exch}-{rand(DIGITS, 4)}".encode()


FAKES = {
    "aws-access-key-id": aws_key_id,
    "aws-secret-access-key": aws_secret_line,
    "google-api-key": google_api_key,
    "gcp-service-account": gcp_service_account,
    "azure-storage-account-key": azure_connection_string,
    "azure-shared-access-key": azure_shared_access_key,
    "github-token": gh_token,
    "github-fine-grained-pat": github_fine_grained,
    "gitlab-token": gitlab_token,
    "npm-token": npm_token,
    "pypi-token": pypi_token,
    "slack-token": slack_token,
    "slack-webhook": slack_webhook,
    "stripe-live-key": stripe_key,
    "openai-key": openai_key,
    "openai-project-key": openai_project_key,
    "anthropic-key": anthropic_key,
    "twilio-api-key": twilio_api_key,
    "twilio-auth-token": twilio_auth_token,
    "sendgrid-key": sendgrid_key,
    "private-key": pem_private_key,
    "private-key-header": lambda: pem_private_key("EC").split(b"\n")[0] + b"\n(truncated)",
    "jwt": jwt,
    "url-credentials": url_with_password,
    "generic-assignment": generic_assignment,
    "credit-card": lambda: card_number(" "),
    "us-ssn": ssn,
    "email": email,
    "phone-e164": phone_e164,
    "phone-nanp": phone_nanp,
}


def _upper_hex(n):
    return rand("0123456789ABCDEF", n)


HARD_NEGATIVES = {
    "aws-access-key-id": lambda: [b"AKIA" + b"IOSFODNN7" + b"EXAMPLE", b"AKIA" + rand(LOWER, 16).encode(),
                                  b"XAKIA" + rand(UPPER, 16).encode()],
    "aws-secret-access-key": lambda: [b"aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + b"EXAMPLEKEY",
                                      b"aws_session_sha = " + rand("0123456789abcdef", 40).encode()],
    "google-api-key": lambda: [b"AIza" + rand(B62, 20).encode()],
    "gcp-service-account": lambda: [b'{"type": "service_account", "project_id": "x"}'],
    "azure-storage-account-key": lambda: [b"AccountKey=" + base64.b64encode(_rng.randbytes(48))],
    "azure-shared-access-key": lambda: [b"SharedAccessKey=<your-key>"],
    "github-token": lambda: [gh_token(valid=False), b"ghp_" + b"x" * 36],
    "github-fine-grained-pat": lambda: [b"github" + b"_pat_" + rand(B62, 22).encode()],
    "gitlab-token": lambda: [b"glpat-" + b"x" * 20, b"glpat-" + rand(LOWER, 10).encode()],
    "npm-token": lambda: [npm_token(valid=False)],
    "pypi-token": lambda: [b"pypi-" + rand(B64URL, 60).encode()],
    "slack-token": lambda: [b"xoxb-" + b"not-a-token", b"xoxb-" + b"1" * 12 + b"-xxxxxxxxxxxx"],
    "slack-webhook": lambda: [b"https://hooks.slack.com/services/T00000000/B00000000/" + b"X" * 24],
    "stripe-live-key": lambda: [b"sk_" + b"test_" + rand(B62, 24).encode(), b"sk_live_" + b"x" * 24],
    "openai-key": lambda: [b"sk-" + rand(LOWER, 20).encode(), b"task-runner-disk-usage-report"],
    "openai-project-key": lambda: [b"sk-proj-" + b"x" * 48],
    "anthropic-key": lambda: [b"sk-ant-api03-" + b"x" * 40],
    "twilio-api-key": lambda: [b"SK" + _upper_hex(32).encode(), b"ASK" + rand("0123456789abcdef", 32).encode()],
    "twilio-auth-token": lambda: [b"TWILIO_AUTH_TOKEN=" + b"0" * 32],
    "sendgrid-key": lambda: [b"SG." + rand(B62, 10).encode()],
    "private-key": lambda: [b"-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(_rng.randbytes(200))
                            + b"-----END PUBLIC KEY-----", b"-----BEGIN CERTIFICATE-----\nMIIB\n"],
    "private-key-header": lambda: [b"BEGIN PRIVATE KEY", b"-----BEGIN PUBLIC KEY-----"],
    "jwt": lambda: [b"eyJhbGciOi" + b"." + rand(B62, 20).encode() + b"." + rand(B62, 20).encode(),
                    base64.urlsafe_b64encode(b'{"typ":"x"}').rstrip(b"=") + b".eyJ" + rand(B62, 20).encode()
                    + b"." + rand(B62, 20).encode()],
    "url-credentials": lambda: [b"https://user:${PASSWORD}@host.internal/x", b"https://github.com/org/repo.git",
                                b"postgres://app:<password>@db:5432/app"],
    "generic-assignment": lambda: [b"password = getpass()", b"token: ${{ secrets.GH_TOKEN }}",
                                   b"password=changeme123", b"secret_key = settings.SECRET_KEY",
                                   b"token = tokenizer.encode"],
    "credit-card": lambda: [card_number(" ", valid=False), b"4111 1111 1111 1111",
                            card_number("", prefix="1"), b"1732528263123456789"],
    "us-ssn": lambda: [b"000-12-3456", b"666-12-3456", b"912-12-3456", b"123-00-4567", b"123-45-0000",
                       b"078-05-1120"],
    "email": lambda: [b"dev@example.com", b"noreply@github.com", b"jane@users.noreply.github.com",
                      b"image@2x.png", b"lodash@4.17.21"],
    "phone-e164": lambda: [b"+1234567890", b"+0" + rand(DIGITS, 9).encode()],
    "phone-nanp": lambda: [b"123-456-7890", b"(555) 011-2345", b"212-555-0123", b"2024-11-25"],
}
