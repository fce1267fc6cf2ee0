HELP = "print the version"


def add_arguments(parser):
    pass


def run(args):
    from sandbox import __version__
    print(f"sandboxctl {__version__}")
    return 0
