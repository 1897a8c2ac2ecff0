/* Rows of rendered Arrow string columns -> one JSON message per row, as Python bytes or str.
 *
 * serialize.py renders every column to text with polars (numbers, timestamps, decimals: the
 * format's rules, vectorized) and hands the columns here, as Arrow string views read in place.
 * This loop pastes each row's pieces together and makes the Python object straight from them.
 * It replaces polars' pl.format() (which wrote every message into one more Arrow buffer) and
 * Series.to_list() (which copied them out again): two passes over ~1 KB per row, 0.9 us of the
 * encoder's 1.7 us on the benchmark's chunk (docs/benchmarks.md, "jobrunner").
 *
 * Strings are JSON-escaped here too, as json.dumps(ensure_ascii=False) does, and only values
 * that need it: a value is first scanned for `"`, `\` and bytes below 0x20 (16 bytes at a
 * time), then copied whole.
 *
 * The caller (serialize.py) guarantees the layout: each column is one chunk of an Arrow
 * string-view array (16-byte views; values of up to 12 bytes inline, longer ones in a data
 * buffer), its buffers alive for the whole call. Buffer indexes are checked anyway.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { RAW = 0, QUOTED = 1, STRING = 2 };  /* as is | between quotes | between quotes, escaped */

typedef struct {
    int32_t size;
    union {
        char inline_data[12];
        struct { char prefix[4]; int32_t buffer; int32_t offset; } ref;
    } u;
} View;

typedef struct {
    const char *lead;          /* literal text before the value, e.g. `,"name":` */
    Py_ssize_t lead_len;
    const uint8_t *validity;   /* NULL: no nulls */
    const View *views;
    const char **buffers;
    Py_ssize_t n_buffers;
    Py_ssize_t offset;         /* the array's offset into its buffers (a slice) */
    Py_ssize_t length;         /* the array's length */
    int mode;
    PyObject *lead_obj;        /* borrowed: the caller's list keeps it alive */
} Column;

/* The buffer rows() writes into, kept between calls (a Scratch): a new one for every batch was
 * fresh memory from the kernel each time, and its page faults cost more than the writing. */
typedef struct { char *data; size_t len, cap; int busy; } Out;

#define SCRATCH "beam_jobrunner._rows.Scratch"

static void scratch_free(PyObject *capsule) {
    Out *o = PyCapsule_GetPointer(capsule, SCRATCH);
    if (o != NULL) {
        free(o->data);
        free(o);
    }
}

/* scratch() -> an opaque buffer for rows(), to be used by one thread at a time */
static PyObject *scratch(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    Out *o = calloc(1, sizeof(Out));
    if (o == NULL)
        return PyErr_NoMemory();
    PyObject *capsule = PyCapsule_New(o, SCRATCH, scratch_free);
    if (capsule == NULL)
        free(o);
    return capsule;
}

/* Failures found without the GIL, raised once it is held again. */
enum { OK = 0, NO_MEMORY = -1, BAD_VIEW = -2 };

static int reserve(Out *o, size_t more) {
    if (o->len + more <= o->cap)
        return OK;
    size_t cap = o->cap ? o->cap : 1 << 20;
    while (cap < o->len + more)
        cap *= 2;
    char *p = realloc(o->data, cap);  /* not PyMem_: this runs without the GIL */
    if (p == NULL)
        return NO_MEMORY;
    o->data = p;
    o->cap = cap;
    return OK;
}

static inline int is_null(const Column *c, Py_ssize_t i) {
    Py_ssize_t j = c->offset + i;
    return c->validity != NULL && !((c->validity[j >> 3] >> (j & 7)) & 1);
}

static inline int value(const Column *c, Py_ssize_t i, const char **p, size_t *n) {
    const View *v = &c->views[c->offset + i];
    if (v->size < 0)
        return BAD_VIEW;
    *n = (size_t)v->size;
    if (v->size <= 12) {
        *p = v->u.inline_data;
        return OK;
    }
    if (v->u.ref.buffer < 0 || v->u.ref.buffer >= c->n_buffers || v->u.ref.offset < 0)
        return BAD_VIEW;
    *p = c->buffers[v->u.ref.buffer] + v->u.ref.offset;
    return OK;
}

static inline int special(unsigned char ch) {
    return ch < 0x20 || ch == '"' || ch == '\\';
}

static int needs_escape_bytewise(const unsigned char *p, size_t n) {
    for (size_t k = 0; k < n; k++)
        if (special(p[k]))
            return 1;
    return 0;
}

#ifdef __SSE2__
#include <emmintrin.h>
/* 16 bytes a step (x86-64 always has SSE2); gcc's own vectorization of the plain loop below
 * ran at ~4 instructions a byte, most of the row assembler's time. */
static int needs_escape(const unsigned char *p, size_t n) {
    if (n < 16)
        return needs_escape_bytewise(p, n);
    const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\'), limit = _mm_set1_epi8(0x1f);
    __m128i acc = _mm_setzero_si128();
    for (size_t k = 0;; k += 16) {
        if (k + 16 > n)
            k = n - 16;  /* the last block overlaps the one before: no scalar tail */
        __m128i x = _mm_loadu_si128((const __m128i *)(p + k));
        __m128i control = _mm_cmpeq_epi8(_mm_max_epu8(x, limit), limit);  /* x <= 0x1f, unsigned */
        acc = _mm_or_si128(acc, _mm_or_si128(control, _mm_or_si128(_mm_cmpeq_epi8(x, quote), _mm_cmpeq_epi8(x, backslash))));
        if (k + 16 == n)
            break;
    }
    return _mm_movemask_epi8(acc) != 0;
}
#else
#define needs_escape needs_escape_bytewise
#endif

/* Writes p[0:n] at w as a JSON string, quotes included; returns the end. Room for 6n+2. */
static char *escaped(char *w, const unsigned char *p, size_t n) {
    static const char hex[] = "0123456789abcdef";
    *w++ = '"';
    for (size_t k = 0; k < n; k++) {
        unsigned char ch = p[k];
        if (!special(ch)) {
            *w++ = (char)ch;
            continue;
        }
        *w++ = '\\';
        switch (ch) {
        case '"': *w++ = '"'; break;
        case '\\': *w++ = '\\'; break;
        case '\b': *w++ = 'b'; break;
        case '\f': *w++ = 'f'; break;
        case '\n': *w++ = 'n'; break;
        case '\r': *w++ = 'r'; break;
        case '\t': *w++ = 't'; break;
        default:
            *w++ = 'u'; *w++ = '0'; *w++ = '0';
            *w++ = hex[ch >> 4]; *w++ = hex[ch & 15];
        }
    }
    *w++ = '"';
    return w;
}

/* Appends row i to o: lead_0 value_0 lead_1 value_1 ... tail. Its worst-case size is reserved
 * once (a string escaped may grow 6x), then the pieces are written with no check each. */
static int write_row(Out *o, const Column *cols, Py_ssize_t ncols, Py_ssize_t i, const char *tail, size_t tail_len) {
    size_t need = tail_len;
    for (Py_ssize_t k = 0; k < ncols; k++) {
        const Column *c = &cols[k];
        need += (size_t)c->lead_len + 4;  /* "null", or the quotes around a value */
        if (!is_null(c, i)) {
            int32_t size = c->views[c->offset + i].size;
            if (size < 0)
                return BAD_VIEW;
            need += (size_t)size * (c->mode == STRING ? 6 : 1);
        }
    }
    if (reserve(o, need) != OK)
        return NO_MEMORY;
    char *w = o->data + o->len;
    for (Py_ssize_t k = 0; k < ncols; k++) {
        const Column *c = &cols[k];
        memcpy(w, c->lead, (size_t)c->lead_len);
        w += c->lead_len;
        if (is_null(c, i)) {
            memcpy(w, "null", 4);
            w += 4;
            continue;
        }
        const char *p;
        size_t n;
        int err = value(c, i, &p, &n);
        if (err != OK)
            return err;
        if (c->mode == RAW) {
            memcpy(w, p, n);
            w += n;
        } else if (c->mode == QUOTED || !needs_escape((const unsigned char *)p, n)) {
            *w++ = '"';
            memcpy(w, p, n);
            w += n;
            *w++ = '"';
        } else {
            w = escaped(w, (const unsigned char *)p, n);
        }
    }
    memcpy(w, tail, tail_len);
    o->len = (size_t)(w + tail_len - o->data);
    return OK;
}

static PyObject *raise(int err) {
    if (err == NO_MEMORY)
        return PyErr_NoMemory();
    PyErr_SetString(PyExc_ValueError, "_rows: a string view points outside its buffers");
    return NULL;
}

static PyObject *make(const char *p, size_t n, int as_str) {
    return as_str ? PyUnicode_DecodeUTF8(p, (Py_ssize_t)n, "strict") : PyBytes_FromStringAndSize(p, (Py_ssize_t)n);
}

/* (lead: bytes, validity: int, views: int, buffers: tuple[int], offset: int, length: int, mode: int):
 * a column's Arrow string-view array by its buffers' addresses, and how to write its values. */
static int parse_column(PyObject *t, Column *c) {
    PyObject *buffers;
    unsigned long long validity, views;
    if (!PyArg_ParseTuple(t, "SKKO!nni", &c->lead_obj, &validity, &views, &PyTuple_Type, &buffers, &c->offset, &c->length, &c->mode))
        return -1;
    if (c->mode < RAW || c->mode > STRING || c->offset < 0 || views == 0) {
        PyErr_SetString(PyExc_ValueError, "_rows: bad column (mode, offset or views)");
        return -1;
    }
    c->lead = PyBytes_AS_STRING(c->lead_obj);
    c->lead_len = PyBytes_GET_SIZE(c->lead_obj);
    c->validity = (const uint8_t *)(uintptr_t)validity;
    c->views = (const View *)(uintptr_t)views;
    c->n_buffers = PyTuple_GET_SIZE(buffers);
    c->buffers = PyMem_Calloc(c->n_buffers ? c->n_buffers : 1, sizeof(char *));
    if (c->buffers == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t b = 0; b < c->n_buffers; b++) {
        unsigned long long a = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(buffers, b));
        if (PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "_rows: a buffer must be an int address");
            return -1;
        }
        c->buffers[b] = (const char *)(uintptr_t)a;
    }
    return 0;
}

static int check_rows(const Column *cols, Py_ssize_t ncols, Py_ssize_t n) {
    for (Py_ssize_t k = 0; k < ncols; k++)
        if (n < 0 || n > cols[k].length) {
            PyErr_Format(PyExc_ValueError, "_rows: %zd rows asked of a column of %zd", n, cols[k].length);
            return -1;
        }
    return 0;
}

static void free_columns(Column *cols, Py_ssize_t n) {
    for (Py_ssize_t k = 0; k < n; k++)
        PyMem_Free((void *)cols[k].buffers);
    PyMem_Free(cols);
}

/* rows(columns: list[tuple], tail: bytes, n: int, as_str: bool, scratch) -> list[bytes | str]
 * Row i: lead_0 value_0 lead_1 value_1 ... tail.
 * Every row is written into one buffer with the GIL released (the producing thread holds it
 * for each message it sends), then the GIL is taken once to make the n objects: a copy each. */
static PyObject *rows(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *spec, *tail_obj, *capsule;
    Py_ssize_t n;
    int as_str;
    if (!PyArg_ParseTuple(args, "O!SnpO", &PyList_Type, &spec, &tail_obj, &n, &as_str, &capsule))
        return NULL;
    Out *o = PyCapsule_GetPointer(capsule, SCRATCH);
    if (o == NULL)
        return NULL;
    if (o->busy) {  /* checked and set with the GIL held */
        PyErr_SetString(PyExc_RuntimeError, "_rows: a scratch buffer is in use by another thread");
        return NULL;
    }
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "_rows: negative row count");
        return NULL;
    }
    Py_ssize_t ncols = PyList_GET_SIZE(spec);
    Column *cols = PyMem_Calloc(ncols ? ncols : 1, sizeof(Column));
    size_t *ends = PyMem_Malloc(((size_t)n + 1) * sizeof(size_t));
    PyObject *out = NULL;
    int err = OK;
    if (cols == NULL || ends == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < ncols; k++)
        if (parse_column(PyList_GET_ITEM(spec, k), &cols[k]) < 0)
            goto done;
    if (check_rows(cols, ncols, n) < 0)
        goto done;
    const char *tail = PyBytes_AS_STRING(tail_obj);
    size_t tail_len = (size_t)PyBytes_GET_SIZE(tail_obj);
    o->len = 0;
    o->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && err == OK; i++) {
        err = write_row(o, cols, ncols, i, tail, tail_len);
        ends[i] = o->len;
    }
    Py_END_ALLOW_THREADS
    o->busy = 0;
    if (err != OK) {
        raise(err);
        goto done;
    }
    out = PyList_New(n);
    if (out == NULL)
        goto done;
    for (Py_ssize_t i = 0, start = 0; i < n; start = (Py_ssize_t)ends[i], i++) {
        PyObject *msg = make(o->data + start, ends[i] - (size_t)start, as_str);
        if (msg == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, msg);
    }
done:
    PyMem_Free(ends);
    if (cols != NULL)
        free_columns(cols, ncols);
    return out;
}

/* values(column: tuple, n: int, as_str: bool) -> list[bytes | str | None]: one column's
 * values as they are (the Kafka key), None for a null. */
static PyObject *values(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *spec;
    Py_ssize_t n;
    int as_str;
    if (!PyArg_ParseTuple(args, "O!np", &PyTuple_Type, &spec, &n, &as_str))
        return NULL;
    Column *c = PyMem_Calloc(1, sizeof(Column));
    if (c == NULL)
        return PyErr_NoMemory();
    PyObject *out = NULL;
    if (parse_column(spec, c) < 0 || check_rows(c, 1, n) < 0)
        goto done;
    out = PyList_New(n);
    if (out == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v;
        if (is_null(c, i)) {
            v = Py_NewRef(Py_None);
        } else {
            const char *p;
            size_t len;
            int err = value(c, i, &p, &len);
            if (err != OK) {
                raise(err);
                Py_CLEAR(out);
                goto done;
            }
            v = make(p, len, as_str);
            if (v == NULL) {
                Py_CLEAR(out);
                goto done;
            }
        }
        PyList_SET_ITEM(out, i, v);
    }
done:
    free_columns(c, 1);
    return out;
}

static PyMethodDef methods[] = {
    {"scratch", scratch, METH_NOARGS, "scratch() -> a buffer for rows(), one thread at a time"},
    {"rows", rows, METH_VARARGS, "rows(columns, tail, n, as_str, scratch) -> one JSON text per row"},
    {"values", values, METH_VARARGS, "values(column, n, as_str) -> one column's values, None for null"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rows", "Assembles JSON rows from Arrow string views.", -1, methods};

PyMODINIT_FUNC PyInit__rows(void) { return PyModule_Create(&module); }
