# OpenMP declarations that also compile without OpenMP (serial build), as in
# scikit-learn's sklearn/utils/_openmp_helpers.pxd.
cdef extern from *:
    """
    #ifdef _OPENMP
        #include <omp.h>
        #define FLATOPT_OPENMP 1
        #define FLATOPT_OPENMP_VERSION _OPENMP
    #else
        #define FLATOPT_OPENMP 0
        #define FLATOPT_OPENMP_VERSION 0
        #define omp_get_max_threads() 1
        #define omp_set_num_threads(n)
    #endif
    """
    bint FLATOPT_OPENMP
    int FLATOPT_OPENMP_VERSION
    int omp_get_max_threads() noexcept nogil
