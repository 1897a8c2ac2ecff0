/* Rows of rendered Arrow string columns -> one JSON message per row.
 *
 * serialize.py renders the columns to text with polars (numbers, timestamps, decimals: the
 * format's rules, vectorized) and hands them here, as Arrow string views read in place; 64-bit
 * integers and microsecond timestamps come as they are, and are written here.
 * rows() pastes each row's pieces, one row after the other, into one buffer per batch,
 * without the GIL; the Kafka sink gets each message as a Message (a read-only
 * bytes-like view of that buffer, no copy), the other sinks as str. It replaced polars'
 * pl.format() and Series.to_list(), which wrote every message twice more (docs/benchmarks.md,
 * "jobrunner").
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

/* How a column's values are written. String views: as they are | between quotes | between
 * quotes, JSON-escaped. Primitive arrays, rendered here: INT64 as a number, between quotes
 * beyond 2^53 - 1 (JSON readers round those); TIMESTAMP (int64 microseconds since the epoch,
 * UTC, years 1-9999) as "YYYY-MM-DDTHH:MM:SSZ", with .ffffff before the Z when not whole. */
enum { RAW = 0, QUOTED = 1, STRING = 2, INT64 = 3, TIMESTAMP = 4 };
#define MAX_SAFE_INT 9007199254740991LL

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
    const View *views;         /* string views; NULL for INT64 and TIMESTAMP */
    const int64_t *ints;       /* INT64 and TIMESTAMP: the values */
    const char **buffers;
    Py_ssize_t n_buffers;
    Py_ssize_t offset;         /* the array's offset into its buffers (a slice) */
    Py_ssize_t length;         /* the array's length */
    int mode;
    PyObject *lead_obj;        /* borrowed: the caller's list keeps it alive */
} Column;

/* Failures found without the GIL, raised once it is held again. */
enum { OK = 0, NO_MEMORY = -1, BAD_VIEW = -2, BAD_TIME = -3 };

/* A batch's messages are written one after the other into one buffer (a slab). Buffers are
 * reused: a fresh one for every batch was new memory from the kernel each time, and its page
 * faults cost more than the writing. The pool and the slabs' reference counts are touched only
 * with the GIL held; a buffer taken from the pool belongs to one call until it is given back. */
typedef struct { char *data; size_t cap; } Buf;

#define POOL_SIZE 4  /* batches alive at once: one produced, one encoded, two queued between */
static Buf pool[POOL_SIZE];
static int pool_len;

static Buf take_buf(void) {
    Buf b = {NULL, 0};
    if (pool_len > 0)
        b = pool[--pool_len];
    return b;
}

static void give_buf(Buf b) {
    if (pool_len < POOL_SIZE)
        pool[pool_len++] = b;
    else
        free(b.data);
}

static int reserve(Buf *b, size_t size) {
    if (size <= b->cap)
        return OK;
    size_t cap = b->cap ? b->cap : 1 << 20;
    while (cap < size)
        cap *= 2;
    char *p = realloc(b->data, cap);  /* not PyMem_: this runs without the GIL */
    if (p == NULL)
        return NO_MEMORY;
    b->data = p;
    b->cap = cap;
    return OK;
}

/* Slab: owns a batch's buffer while any of its messages lives. */
typedef struct {
    PyObject_HEAD
    Buf buf;
} Slab;

static void slab_dealloc(PyObject *self) {
    give_buf(((Slab *)self)->buf);
    PyObject_Free(self);
}

static PyTypeObject SlabType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "beam_jobrunner._rows.Slab",
    .tp_basicsize = sizeof(Slab),
    .tp_dealloc = slab_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The buffer a batch's messages live in.",
};

/* Message: one row's JSON, read-only bytes-like (the buffer protocol) over its slab. It is what
 * the Kafka sink hands to produce(), which copies it: unlike a bytes object, making and freeing
 * one costs no malloc() of the message's size (~1 KB), which glibc serves slowly when 50,000
 * are made in one thread and freed in another. */
typedef struct {
    PyObject_HEAD
    PyObject *slab;
    const char *data;
    Py_ssize_t size;
} Message;

static void message_dealloc(PyObject *self) {
    Py_DECREF(((Message *)self)->slab);
    PyObject_Free(self);
}

static int message_getbuffer(PyObject *self, Py_buffer *view, int flags) {
    Message *m = (Message *)self;
    return PyBuffer_FillInfo(view, self, (void *)m->data, m->size, 1, flags);
}

static Py_ssize_t message_len(PyObject *self) { return ((Message *)self)->size; }

static PyObject *message_repr(PyObject *self) {
    Message *m = (Message *)self;
    PyObject *b = PyBytes_FromStringAndSize(m->data, m->size);
    if (b == NULL)
        return NULL;
    PyObject *r = PyUnicode_FromFormat("Message(%R)", b);
    Py_DECREF(b);
    return r;
}

/* No releasebuffer: the argument parsers that take read-only bytes-like objects (y#, s#, z#,
 * as confluent-kafka's produce() uses) refuse types that have one. */
static PyBufferProcs message_as_buffer = {message_getbuffer, NULL};
static PySequenceMethods message_as_sequence = {.sq_length = message_len};

static PyTypeObject MessageType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "beam_jobrunner._rows.Message",
    .tp_basicsize = sizeof(Message),
    .tp_dealloc = message_dealloc,
    .tp_repr = message_repr,
    .tp_as_sequence = &message_as_sequence,
    .tp_as_buffer = &message_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One message: read-only bytes-like; bytes(m) copies it.",
};

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

/* Writes p[0:n] at w as a JSON string, quotes included (at most 6n + 2 bytes); returns the end. */
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

/* Decimal digits of u. */
static inline size_t digits(uint64_t u) {
    size_t n = 1;
    for (uint64_t p = 10; n < 20 && u >= p; p *= 10)
        n++;
    return n;
}

static inline uint64_t magnitude(int64_t v) { return v < 0 ? 0 - (uint64_t)v : (uint64_t)v; }

static char *write_int(char *w, int64_t v) {
    int quoted = v > MAX_SAFE_INT || v < -MAX_SAFE_INT;
    if (quoted)
        *w++ = '"';
    if (v < 0)
        *w++ = '-';
    uint64_t u = magnitude(v);
    size_t n = digits(u);
    for (char *d = w + n - 1; d >= w; d--) {
        *d = (char)('0' + u % 10);
        u /= 10;
    }
    w += n;
    if (quoted)
        *w++ = '"';
    return w;
}

static inline int64_t floor_div(int64_t a, int64_t b) { return a / b - (a % b != 0 && (a < 0) != (b < 0)); }

/* Microseconds 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999Z, the years written with 4 digits. */
#define MIN_MICROS (-62135596800000000LL)
#define MAX_MICROS (253402300799999999LL)

static char *two(char *w, unsigned v) {
    w[0] = (char)('0' + v / 10);
    w[1] = (char)('0' + v % 10);
    return w + 2;
}

/* The civil date of a day count from 1970-01-01 (proleptic Gregorian): H. Hinnant's
 * civil_from_days, with 400-year eras. */
static char *write_time(char *w, int64_t us) {
    int64_t secs = floor_div(us, 1000000), days = floor_div(secs, 86400);
    unsigned frac = (unsigned)(us - secs * 1000000), sod = (unsigned)(secs - days * 86400);
    int64_t z = days + 719468, era = floor_div(z, 146097);
    unsigned doe = (unsigned)(z - era * 146097);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100), mp = (5 * doy + 2) / 153;
    unsigned day = doy - (153 * mp + 2) / 5 + 1, month = mp < 10 ? mp + 3 : mp - 9;
    unsigned year = (unsigned)(yoe + era * 400 + (month <= 2));
    *w++ = '"';
    w = two(w, year / 100);
    w = two(w, year % 100);
    *w++ = '-';
    w = two(w, month);
    *w++ = '-';
    w = two(w, day);
    *w++ = 'T';
    w = two(w, sod / 3600);
    *w++ = ':';
    w = two(w, sod / 60 % 60);
    *w++ = ':';
    w = two(w, sod % 60);
    if (frac) {
        *w++ = '.';
        w = two(w, frac / 10000);
        w = two(w, frac / 100 % 100);
        w = two(w, frac % 100);
    }
    *w++ = 'Z';
    *w++ = '"';
    return w;
}

/* An upper bound of the size of row i (lead_0 value_0 lead_1 value_1 ... tail): a string may
 * grow 6x escaped. It also makes the checks that write_row() relies on: every view inside its
 * buffers, every timestamp in the years it writes. */
static int bound_row(const Column *cols, Py_ssize_t ncols, Py_ssize_t i, size_t tail_len, size_t *size) {
    size_t need = tail_len;
    for (Py_ssize_t k = 0; k < ncols; k++) {
        const Column *c = &cols[k];
        need += (size_t)c->lead_len + 4;  /* null, or the quotes around a value */
        if (is_null(c, i))
            continue;
        if (c->mode == INT64) {
            need += 20;  /* sign and 19 digits */
            continue;
        }
        if (c->mode == TIMESTAMP) {
            int64_t us = c->ints[c->offset + i];
            if (us < MIN_MICROS || us > MAX_MICROS)
                return BAD_TIME;
            need += 27;
            continue;
        }
        const char *p;
        size_t n;
        int err = value(c, i, &p, &n);
        if (err != OK)
            return err;
        need += c->mode == STRING ? 6 * n : n;
    }
    *size = need;
    return OK;
}

/* Writes row i at w, after bound_row() made room for it and checked it; returns the end.
 * Strings are scanned and copied in one go, while they are in the cache. */
static char *write_row(char *w, const Column *cols, Py_ssize_t ncols, Py_ssize_t i, const char *tail, size_t tail_len) {
    for (Py_ssize_t k = 0; k < ncols; k++) {
        const Column *c = &cols[k];
        memcpy(w, c->lead, (size_t)c->lead_len);
        w += c->lead_len;
        if (is_null(c, i)) {
            memcpy(w, "null", 4);
            w += 4;
            continue;
        }
        if (c->mode == INT64) {
            w = write_int(w, c->ints[c->offset + i]);
            continue;
        }
        if (c->mode == TIMESTAMP) {
            w = write_time(w, c->ints[c->offset + i]);
            continue;
        }
        const char *p;
        size_t n;
        value(c, i, &p, &n);
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
    return w + tail_len;
}

static PyObject *raise(int err) {
    if (err == NO_MEMORY)
        return PyErr_NoMemory();
    PyErr_SetString(PyExc_ValueError, err == BAD_TIME ? "_rows: a timestamp outside the years 1-9999"
                                                       : "_rows: a string view points outside its buffers");
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
    if (c->mode < RAW || c->mode > TIMESTAMP || c->offset < 0 || views == 0) {
        PyErr_SetString(PyExc_ValueError, "_rows: bad column (mode, offset or views)");
        return -1;
    }
    c->lead = PyBytes_AS_STRING(c->lead_obj);
    c->lead_len = PyBytes_GET_SIZE(c->lead_obj);
    c->validity = (const uint8_t *)(uintptr_t)validity;
    if (c->mode >= INT64)
        c->ints = (const int64_t *)(uintptr_t)views;
    else
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

/* Every column of `spec` into `cols`, each holding at least `n` rows. */
static int parse_columns(PyObject *spec, Column *cols, Py_ssize_t ncols, Py_ssize_t n) {
    for (Py_ssize_t k = 0; k < ncols; k++)
        if (parse_column(PyList_GET_ITEM(spec, k), &cols[k]) < 0)
            return -1;
    return check_rows(cols, ncols, n);
}

static void free_columns(Column *cols, Py_ssize_t n) {
    for (Py_ssize_t k = 0; k < n; k++)
        PyMem_Free((void *)cols[k].buffers);
    PyMem_Free(cols);
}

/* rows(columns: list[tuple], tail: bytes, n: int, as_str: bool) -> (list[Message | str], int)
 * Row i: lead_0 value_0 lead_1 value_1 ... tail; and the UTF-8 size of all n rows.
 * The producing thread holds the GIL for every message it sends, so the rows are written
 * without it, into a slab; with it, one Message per row is made over the slab (a small
 * object, no copy), or a str decoded from it (the slab then goes back to the pool). */
static PyObject *rows(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *spec, *tail_obj;
    Py_ssize_t n;
    int as_str;
    if (!PyArg_ParseTuple(args, "O!Snp", &PyList_Type, &spec, &tail_obj, &n, &as_str))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "_rows: negative row count");
        return NULL;
    }
    Py_ssize_t ncols = PyList_GET_SIZE(spec);
    Column *cols = PyMem_Calloc(ncols ? ncols : 1, sizeof(Column));
    size_t *ends = PyMem_Malloc(((size_t)n + 1) * sizeof(size_t));
    PyObject *out = NULL, *list = NULL, *slab = NULL;
    Buf buf = {NULL, 0};
    int err = OK, have_buf = 0;
    if (cols == NULL || ends == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (parse_columns(spec, cols, ncols, n) < 0)
        goto done;
    const char *tail = PyBytes_AS_STRING(tail_obj);
    size_t tail_len = (size_t)PyBytes_GET_SIZE(tail_obj);
    size_t total = 0;
    buf = take_buf();
    have_buf = 1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && err == OK; i++) {
        size_t bound;
        err = bound_row(cols, ncols, i, tail_len, &bound);
        if (err == OK)
            err = reserve(&buf, total + bound);
        if (err == OK)
            total = (size_t)(write_row(buf.data + total, cols, ncols, i, tail, tail_len) - buf.data);
        ends[i] = total;
    }
    Py_END_ALLOW_THREADS
    if (err != OK) {
        raise(err);
        goto done;
    }
    list = PyList_New(n);
    if (list == NULL)
        goto done;
    if (!as_str) {
        slab = (PyObject *)PyObject_New(Slab, &SlabType);
        if (slab == NULL)
            goto done;
        ((Slab *)slab)->buf = buf;
        have_buf = 0;  /* the slab gives it back when its last message goes */
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        size_t start = i ? ends[i - 1] : 0, size = ends[i] - start;
        PyObject *msg;
        if (as_str) {
            msg = make(buf.data + start, size, 1);
        } else {
            Message *m = PyObject_New(Message, &MessageType);
            if (m != NULL) {
                m->slab = Py_NewRef(slab);
                m->data = buf.data + start;
                m->size = (Py_ssize_t)size;
            }
            msg = (PyObject *)m;
        }
        if (msg == NULL)
            goto done;
        PyList_SET_ITEM(list, i, msg);
    }
    out = Py_BuildValue("(On)", list, (Py_ssize_t)total);
done:
    Py_XDECREF(list);
    Py_XDECREF(slab);
    if (have_buf)
        give_buf(buf);
    PyMem_Free(ends);
    if (cols != NULL)
        free_columns(cols, ncols);
    return out;
}

static PyObject *one_message(Buf buf, size_t size) {
    Slab *slab = PyObject_New(Slab, &SlabType);
    if (slab == NULL) {
        give_buf(buf);
        return NULL;
    }
    slab->buf = buf;
    Message *m = PyObject_New(Message, &MessageType);
    if (m != NULL) {
        m->slab = Py_NewRef((PyObject *)slab);
        m->data = buf.data;
        m->size = (Py_ssize_t)size;
    }
    Py_DECREF(slab);
    return (PyObject *)m;
}

/* array(columns: list[tuple], n: int) -> Message: rows 0 .. n-1 as one JSON array,
 * `[row,row,...]`, written without the GIL into one slab (what a transform gets: one engine call
 * per batch, beam_jobrunner.transform). */
static PyObject *array(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *spec;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "O!n", &PyList_Type, &spec, &n))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "_rows: negative row count");
        return NULL;
    }
    Py_ssize_t ncols = PyList_GET_SIZE(spec);
    Column *cols = PyMem_Calloc(ncols ? ncols : 1, sizeof(Column));
    PyObject *out = NULL;
    Buf buf = {NULL, 0};
    int err = OK, have_buf = 0;
    if (cols == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (parse_columns(spec, cols, ncols, n) < 0)
        goto done;
    size_t total = 0;
    buf = take_buf();
    have_buf = 1;
    Py_BEGIN_ALLOW_THREADS
    err = reserve(&buf, 2);
    if (err == OK)
        buf.data[total++] = '[';
    for (Py_ssize_t i = 0; i < n && err == OK; i++) {
        size_t bound;
        const char *tail = i + 1 < n ? "}," : "}";
        err = bound_row(cols, ncols, i, 2, &bound);
        if (err == OK)
            err = reserve(&buf, total + bound + 1);
        if (err == OK)
            total = (size_t)(write_row(buf.data + total, cols, ncols, i, tail, strlen(tail)) - buf.data);
    }
    if (err == OK)
        buf.data[total++] = ']';
    Py_END_ALLOW_THREADS
    if (err != OK) {
        raise(err);
        goto done;
    }
    have_buf = 0;
    out = one_message(buf, total);
done:
    if (have_buf)
        give_buf(buf);
    if (cols != NULL)
        free_columns(cols, ncols);
    return out;
}

/* lines(text: bytes-like, as_str: bool) -> list[Message | str]: the lines of `text` (split at
 * \n; empty text, no line). Messages are views of one slab the text is copied into, without the
 * GIL; a str is decoded from the text itself. What a transform's output becomes for the sinks. */
static PyObject *lines(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer view;
    int as_str;
    if (!PyArg_ParseTuple(args, "y*p", &view, &as_str))
        return NULL;
    const char *text = view.buf;
    size_t len = (size_t)view.len;
    PyObject *list = NULL, *slab = NULL;
    Py_ssize_t n = 0;
    if (len > 0) {
        n = 1;
        for (const char *p = text; (p = memchr(p, '\n', (size_t)(text + len - p))) != NULL; p++)
            n++;
    }
    list = PyList_New(n);
    if (list == NULL || n == 0)
        goto done;
    const char *base = text;
    if (!as_str) {
        Buf buf = take_buf();
        int err;
        Py_BEGIN_ALLOW_THREADS
        err = reserve(&buf, len);
        if (err == OK)
            memcpy(buf.data, text, len);
        Py_END_ALLOW_THREADS
        if (err != OK) {
            give_buf(buf);
            raise(err);
            Py_CLEAR(list);
            goto done;
        }
        slab = (PyObject *)PyObject_New(Slab, &SlabType);
        if (slab == NULL) {
            give_buf(buf);
            Py_CLEAR(list);
            goto done;
        }
        ((Slab *)slab)->buf = buf;
        base = buf.data;
    }
    const char *start = base, *end = base + len;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *nl = i + 1 < n ? memchr(start, '\n', (size_t)(end - start)) : end;
        size_t size = (size_t)(nl - start);
        PyObject *item;
        if (as_str) {
            item = PyUnicode_DecodeUTF8(start, (Py_ssize_t)size, "strict");
        } else {
            Message *m = PyObject_New(Message, &MessageType);
            if (m != NULL) {
                m->slab = Py_NewRef(slab);
                m->data = start;
                m->size = (Py_ssize_t)size;
            }
            item = (PyObject *)m;
        }
        if (item == NULL) {
            Py_CLEAR(list);
            goto done;
        }
        PyList_SET_ITEM(list, i, item);
        start = nl + 1;
    }
done:
    Py_XDECREF(slab);
    PyBuffer_Release(&view);
    return list;
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
    if (c->mode > STRING) {
        PyErr_SetString(PyExc_ValueError, "_rows: values() reads string views only");
        goto done;
    }
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
    {"rows", rows, METH_VARARGS, "rows(columns, tail, n, as_str) -> (one JSON text per row, their UTF-8 size)"},
    {"values", values, METH_VARARGS, "values(column, n, as_str) -> one column's values, None for null"},
    {"array", array, METH_VARARGS, "array(columns, n) -> the n rows as one JSON array (a Message)"},
    {"lines", lines, METH_VARARGS, "lines(text, as_str) -> its lines, as Messages over one slab or as str"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rows", "Assembles JSON rows from Arrow string views.", -1, methods};

PyMODINIT_FUNC PyInit__rows(void) {
    if (PyType_Ready(&SlabType) < 0 || PyType_Ready(&MessageType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddObjectRef(m, "Message", (PyObject *)&MessageType) < 0)
        Py_CLEAR(m);
    return m;
}
