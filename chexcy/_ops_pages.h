/* chexcy/_ops_pages.h: whole pages from the system (mmap), populated in one call, and given back. The block
 * cache (see _empty in _ops.pyx) maps the large arrays of the compiled ops with these.
 */
#ifndef CHEXCY_OPS_PAGES_H
#define CHEXCY_OPS_PAGES_H

#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>

/* Map the whole pages inside [addr, addr + n) now, in one system call (Linux 5.14+; elsewhere, or on
 * failure, nothing happens and the pages fault in on first touch as usual). Returns madvise's result. */
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
static inline int chexcy_populate(void *addr, size_t n)
{
    uintptr_t page = 4096, a = ((uintptr_t)addr + page - 1) & ~(page - 1);
    uintptr_t e = ((uintptr_t)addr + n) & ~(page - 1);
    return e > a ? madvise((void *)a, e - a, MADV_POPULATE_WRITE) : 0;
}

/* n bytes of fresh anonymous pages (page-aligned), or NULL; and their release. */
static inline void *chexcy_map(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}
static inline void chexcy_unmap(void *p, size_t n) { munmap(p, n); }

#endif
