/*
 * momentum_service.kernels._sgd: torch.optim.SGD's update in one pass, in C.
 *
 * Per element, exactly the sequence of kernels/sgd.py (_update_flat), which reproduces
 * torch 2.13's CPU kernel bit for bit:
 *
 *     g = maximize ? -grad : grad
 *     if (wd != 0)  g = fma(wd, p, g)
 *     if (m != 0)   b = velocity given ? fma(1 - d, g, b*m) : g;   g = nesterov ? fma(m, b, g) : b
 *     p = fma(-lr, g, p)
 *
 * fma(a, y, x) = a*y + x rounded once (C99 fmaf/fma); b*m is one separately rounded product.
 * Scalars arrive as Python floats (double) and are converted to the element type, as torch
 * converts its Python scalars; 1 - d is computed in double first.
 *
 * Exactness rests on the compiler keeping every operation as written: build with
 * -ffp-contract=off and never with -ffast-math (checked below). On x86-64 the loop is
 * compiled twice (GCC/clang target_clones): with hardware FMA, where fmaf/fma become
 * vfmadd, and for the baseline ISA, where they are libm calls; both are correctly rounded,
 * so the two clones give identical results and only the speed differs.
 *
 * Python API (the wrapper in sgd.py allocates the outputs and checks shapes):
 *
 *     sgd_float32(value, velocity, grad, out_value, out_velocity,
 *                 lr, momentum, dampening, weight_decay, nesterov, maximize) -> None
 *     sgd_float64(...same...)
 *
 * value, grad: C-contiguous buffers of float32 ("f") / float64 ("d"), all of one length.
 * velocity: such a buffer or None (before the first momentum update); out_value and
 * out_velocity: writable buffers of the same length, out_velocity None iff momentum == 0
 * (velocity must then be None too: the caller keeps the old one). Outputs must not overlap
 * each other or the inputs. The GIL is released during the loop.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__FAST_MATH__)
#error "_sgd.c must not be compiled with -ffast-math: it would break bitwise parity with torch"
#endif

#if defined(_MSC_VER)
#define SGD_RESTRICT __restrict
#define SGD_INLINE static __forceinline
#else
#define SGD_RESTRICT restrict
#define SGD_INLINE static inline __attribute__((always_inline))
#endif

/* One loop per ISA on x86 ELF targets where the baseline lacks FMA (ifunc dispatch). */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && \
    defined(__ELF__) && !defined(__FMA__)
#define SGD_CLONES __attribute__((target_clones("fma", "default")))
#define SGD_HAVE_CLONES 1
#else
#define SGD_CLONES
#define SGD_HAVE_CLONES 0
#endif

enum {
    F_WD = 1,        /* weight_decay != 0 */
    F_MOMENTUM = 2,  /* momentum != 0 */
    F_VELOCITY = 4,  /* a previous velocity buffer exists (only with F_MOMENTUM) */
    F_NESTEROV = 8,  /* only with F_MOMENTUM */
    F_MAXIMIZE = 16,
};

/* The body, specialized below on compile-time constant flags so that every variant is a
 * branch-free (vectorizable) loop. */
#define DEFINE_KERNEL(T, FMA, NAME)                                                                    \
    SGD_INLINE void NAME##_body(Py_ssize_t n, const T *SGD_RESTRICT p, const T *SGD_RESTRICT b,        \
                                const T *SGD_RESTRICT gr, T *SGD_RESTRICT op, T *SGD_RESTRICT ob,      \
                                T neg_lr, T wd, T m, T one_minus_d, const int flags)                   \
    {                                                                                                  \
        for (Py_ssize_t i = 0; i < n; i++) {                                                           \
            T g = (flags & F_MAXIMIZE) ? -gr[i] : gr[i];                                               \
            if (flags & F_WD) {                                                                        \
                g = FMA(wd, p[i], g);                                                                  \
            }                                                                                          \
            if (flags & F_MOMENTUM) {                                                                  \
                T nb;                                                                                  \
                if (flags & F_VELOCITY) {                                                              \
                    T scaled = b[i] * m; /* rounded on its own */                                      \
                    nb = FMA(one_minus_d, g, scaled);                                                  \
                }                                                                                      \
                else {                                                                                 \
                    nb = g;                                                                            \
                }                                                                                      \
                ob[i] = nb;                                                                            \
                g = (flags & F_NESTEROV) ? FMA(m, nb, g) : nb;                                         \
            }                                                                                          \
            op[i] = FMA(neg_lr, g, p[i]);                                                              \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    SGD_CLONES static void NAME##_loop(Py_ssize_t n, const T *p, const T *b, const T *gr, T *op, T *ob, \
                                       T neg_lr, T wd, T m, T one_minus_d, int flags)                  \
    {                                                                                                  \
        switch (flags) {                                                                               \
        SGD_CASES(NAME)                                                                                \
        default:                                                                                       \
            break;                                                                                     \
        }                                                                                              \
    }

#define SGD_CASE(NAME, k)                                                   \
    case k:                                                                 \
        NAME##_body(n, p, b, gr, op, ob, neg_lr, wd, m, one_minus_d, (k));  \
        break;

/* The valid flag combinations: VELOCITY and NESTEROV only together with MOMENTUM. */
#define SGD_CASES_WD_MAX(NAME, base)                          \
    SGD_CASE(NAME, (base))                                    \
    SGD_CASE(NAME, (base) | F_WD)                             \
    SGD_CASE(NAME, (base) | F_MAXIMIZE)                       \
    SGD_CASE(NAME, (base) | F_WD | F_MAXIMIZE)
#define SGD_CASES(NAME)                                                    \
    SGD_CASES_WD_MAX(NAME, 0)                                              \
    SGD_CASES_WD_MAX(NAME, F_MOMENTUM)                                     \
    SGD_CASES_WD_MAX(NAME, F_MOMENTUM | F_VELOCITY)                        \
    SGD_CASES_WD_MAX(NAME, F_MOMENTUM | F_NESTEROV)                        \
    SGD_CASES_WD_MAX(NAME, F_MOMENTUM | F_VELOCITY | F_NESTEROV)

DEFINE_KERNEL(float, fmaf, sgd_f32)
DEFINE_KERNEL(double, fma, sgd_f64)

/* ------------------------------------------------------------------------------------------ */
/* Argument handling                                                                           */
/* ------------------------------------------------------------------------------------------ */

/* Whether a buffer format string describes one native element of type code `code`. */
static int
format_is(const char *format, char code)
{
    if (format == NULL) {
        return code == 'B';
    }
    if (format[0] == '@' || format[0] == '=') {
        format++;
    }
#if PY_LITTLE_ENDIAN
    else if (format[0] == '<') {
        format++;
    }
#else
    else if (format[0] == '>' || format[0] == '!') {
        format++;
    }
#endif
    return format[0] == code && format[1] == '\0';
}

/* Get a C-contiguous buffer of `itemsize`-byte elements of type `code`; 0 on success. */
static int
get_buffer(PyObject *obj, Py_buffer *view, int writable, char code, Py_ssize_t itemsize, const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s buffer of %s, got %.200s", name,
                     writable ? " writable" : "", code == 'f' ? "float32" : "float64", Py_TYPE(obj)->tp_name);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return -1;
    }
    if (view->itemsize != itemsize || !format_is(view->format, code)) {
        PyErr_Format(PyExc_TypeError, "%s must hold %s elements (format '%c'), got format '%s'", name,
                     code == 'f' ? "float32" : "float64", code, view->format ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    if (view->len % itemsize != 0) {
        PyErr_Format(PyExc_ValueError, "%s: buffer length %zd is not a multiple of %zd", name, view->len, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int
overlaps(const Py_buffer *a, const Py_buffer *b)
{
    if (a->buf == NULL || b->buf == NULL || a->len == 0 || b->len == 0) {
        return 0;
    }
    uintptr_t a0 = (uintptr_t)a->buf, b0 = (uintptr_t)b->buf;
    return a0 < b0 + (uintptr_t)b->len && b0 < a0 + (uintptr_t)a->len;
}

typedef void (*loop_fn)(Py_ssize_t, const void *, const void *, const void *, void *, void *, double, double,
                        double, double, int);

static void
run_f32(Py_ssize_t n, const void *p, const void *b, const void *g, void *op, void *ob, double neg_lr, double wd,
        double m, double one_minus_d, int flags)
{
    sgd_f32_loop(n, (const float *)p, (const float *)b, (const float *)g, (float *)op, (float *)ob, (float)neg_lr,
                 (float)wd, (float)m, (float)one_minus_d, flags);
}

static void
run_f64(Py_ssize_t n, const void *p, const void *b, const void *g, void *op, void *ob, double neg_lr, double wd,
        double m, double one_minus_d, int flags)
{
    sgd_f64_loop(n, (const double *)p, (const double *)b, (const double *)g, (double *)op, (double *)ob, neg_lr, wd,
                 m, one_minus_d, flags);
}

static PyObject *
sgd_generic(PyObject *args, PyObject *kwargs, char code, Py_ssize_t itemsize, loop_fn run)
{
    static char *kwlist[] = {"value", "velocity", "grad", "out_value", "out_velocity", "lr", "momentum",
                             "dampening", "weight_decay", "nesterov", "maximize", NULL};
    PyObject *value_obj, *velocity_obj, *grad_obj, *out_value_obj, *out_velocity_obj;
    double lr, momentum, dampening, weight_decay;
    int nesterov, maximize;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOddddpp:sgd", kwlist, &value_obj, &velocity_obj, &grad_obj,
                                     &out_value_obj, &out_velocity_obj, &lr, &momentum, &dampening, &weight_decay,
                                     &nesterov, &maximize)) {
        return NULL;
    }
    const int has_velocity = velocity_obj != Py_None;
    const int has_out_velocity = out_velocity_obj != Py_None;
    if (momentum == 0.0) {
        if (has_velocity || has_out_velocity) {
            PyErr_SetString(PyExc_ValueError,
                            "with momentum == 0 the velocity is left as it is: pass velocity=None and out_velocity=None");
            return NULL;
        }
        if (nesterov) {
            PyErr_SetString(PyExc_ValueError, "nesterov requires momentum > 0");
            return NULL;
        }
    }
    else if (!has_out_velocity) {
        PyErr_SetString(PyExc_ValueError, "momentum != 0 needs an out_velocity buffer");
        return NULL;
    }

    Py_buffer views[5];
    PyObject *objs[5] = {value_obj, grad_obj, out_value_obj, velocity_obj, out_velocity_obj};
    const char *names[5] = {"value", "grad", "out_value", "velocity", "out_velocity"};
    const int writable[5] = {0, 0, 1, 0, 1};
    int got = 0;
    PyObject *result = NULL;
    for (; got < 5; got++) {
        if (objs[got] == Py_None) {
            memset(&views[got], 0, sizeof(Py_buffer));
            continue;
        }
        if (get_buffer(objs[got], &views[got], writable[got], code, itemsize, names[got]) != 0) {
            goto done;
        }
    }
    const Py_ssize_t len = views[0].len;
    for (int k = 1; k < 5; k++) {
        if (objs[k] != Py_None && views[k].len != len) {
            PyErr_Format(PyExc_ValueError, "%s has %zd elements, value has %zd", names[k], views[k].len / itemsize,
                         len / itemsize);
            goto done;
        }
    }
    /* Outputs (2, 4) must not overlap anything else. */
    for (int out = 2; out < 5; out += 2) {
        for (int k = 0; k < 5; k++) {
            if (k != out && objs[out] != Py_None && objs[k] != Py_None && overlaps(&views[out], &views[k])) {
                PyErr_Format(PyExc_ValueError, "%s overlaps %s: outputs must be separate buffers", names[out],
                             names[k]);
                goto done;
            }
        }
    }

    int flags = 0;
    if (weight_decay != 0.0) flags |= F_WD;
    if (momentum != 0.0) {
        flags |= F_MOMENTUM;
        if (has_velocity) flags |= F_VELOCITY;
        if (nesterov) flags |= F_NESTEROV;
    }
    if (maximize) flags |= F_MAXIMIZE;
    const double one_minus_d = 1.0 - dampening; /* in double, like Python's 1.0 - dampening */
    const double neg_lr = -lr;
    const Py_ssize_t n = len / itemsize;

    Py_BEGIN_ALLOW_THREADS
    run(n, views[0].buf, views[3].buf, views[1].buf, views[2].buf, views[4].buf, neg_lr, weight_decay, momentum,
        one_minus_d, flags);
    Py_END_ALLOW_THREADS

    result = Py_NewRef(Py_None);
done:
    for (int k = 0; k < got; k++) {
        if (objs[k] != Py_None) {
            PyBuffer_Release(&views[k]);
        }
    }
    return result;
}

static PyObject *
sgd_float32(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kwargs)
{
    return sgd_generic(args, kwargs, 'f', (Py_ssize_t)sizeof(float), run_f32);
}

static PyObject *
sgd_float64(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kwargs)
{
    return sgd_generic(args, kwargs, 'd', (Py_ssize_t)sizeof(double), run_f64);
}

static PyObject *
hardware_fma(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
#if defined(__FMA__) || defined(__aarch64__) || defined(__ARM_FEATURE_FMA)
    Py_RETURN_TRUE; /* the whole module is compiled for an ISA with FMA */
#elif SGD_HAVE_CLONES
    __builtin_cpu_init();
    return PyBool_FromLong(__builtin_cpu_supports("fma")); /* what the ifunc resolver decides on */
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(sgd_float32_doc,
             "sgd_float32(value, velocity, grad, out_value, out_velocity, lr, momentum, dampening, weight_decay, "
             "nesterov, maximize)\n--\n\n"
             "One torch.optim.SGD step over float32 buffers, written into out_value (and out_velocity).");
PyDoc_STRVAR(sgd_float64_doc,
             "sgd_float64(value, velocity, grad, out_value, out_velocity, lr, momentum, dampening, weight_decay, "
             "nesterov, maximize)\n--\n\n"
             "One torch.optim.SGD step over float64 buffers, written into out_value (and out_velocity).");
PyDoc_STRVAR(hardware_fma_doc,
             "hardware_fma()\n--\n\n"
             "Whether the loop runs with hardware FMA instructions on this CPU (else libm's fma). "
             "Results are identical either way.");

static PyMethodDef sgd_methods[] = {
    {"sgd_float32", (PyCFunction)(void (*)(void))sgd_float32, METH_VARARGS | METH_KEYWORDS, sgd_float32_doc},
    {"sgd_float64", (PyCFunction)(void (*)(void))sgd_float64, METH_VARARGS | METH_KEYWORDS, sgd_float64_doc},
    {"hardware_fma", hardware_fma, METH_NOARGS, hardware_fma_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef sgd_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "momentum_service.kernels._sgd",
    .m_doc = "torch.optim.SGD's update in one pass over float32/float64 buffers (see kernels/sgd.py).",
    .m_size = 0,
    .m_methods = sgd_methods,
};

PyMODINIT_FUNC
PyInit__sgd(void)
{
    return PyModuleDef_Init(&sgd_module);
}
