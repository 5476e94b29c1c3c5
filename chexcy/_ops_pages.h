/* chexcy/_ops_pages.h: whole pages from the system (mmap), populated in one call, and given back. The block
 * cache (chexcy/_blocks.pyx) maps the large arrays of the compiled ops with these.
 */
#ifndef CHEXCY_OPS_PAGES_H
#define CHEXCY_OPS_PAGES_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
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

/* glibc maps each block above its mmap threshold (128 KiB at start) with fresh pages and unmaps it on
 * free; freeing such a block of up to 32 MiB raises the threshold to that block's size and the heap's
 * trim threshold to twice it. Allocate and free one block just under 32 MiB, so that arrays below it
 * come from the heap and stay mapped between calls from the start, as they do in any process once it
 * has freed an array that large. Elsewhere than glibc: one malloc and one free. */
static inline void chexcy_raise_heap_thresholds(void)
{
    void *volatile p = malloc(((size_t)32 << 20) - ((size_t)64 << 10));
    free(p);
}

#endif
