# chexcy/_blocks.pxd: what chexcy._ops cimports from chexcy._blocks (see _blocks.pyx).

cdef object empty_at(shape, dtype, void** data)
