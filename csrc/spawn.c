#include "native.h"
int sbx_abi_version(void) { return 1; }
