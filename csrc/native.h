/* The C side of sandboxd: the spawn hot path between clone3 and execve. */
#ifndef SANDBOXD_NATIVE_H
#define SANDBOXD_NATIVE_H
int sbx_abi_version(void);
#endif
