/* A text access-log line in one pass (format.py's _render_text_into, in C).
 *
 * Why C: a line of Envoy's default format costs about 4,500 instructions compiled with mypyc
 * (an append and a share of the batch's join per piece, four header scans comparing Python
 * strings, the hit caches that keep the piece count down), about 4 % of a request. Here the
 * same line is one scan of the request headers for every name the format wants, the pieces
 * copied into one buffer, and one string.
 *
 * Contract (format.py is the source of truth; tests/unit/test_access_log_textline.py compares
 * the two on random entries):
 *
 *   Program(ops) compiles a text format's ops, a sequence of tuples
 *     (kind, field, main, main_name, alt, alt_name, max_len, text, suffix, missing,
 *      render, render_head, render_tail, digits)
 *   as format.py's _Op fields; for START_TIME, ``render`` is the whole-format renderer
 *   (used when ``render_head`` is None), ``render_head``/``render_tail`` the whole-second
 *   renderers of a split format and ``digits`` its fraction's digits. Program raises
 *   ValueError for a kind it does not render (addresses) or literal text that is not
 *   latin-1: format.py then keeps the Python renderer.
 *
 *   program(out, start_time, method, path, authority, protocol, upstream_host, details,
 *           termination_details, upstream_cluster, route_name, peer_uri_san, sni,
 *           status, duration_ms, bytes_received, bytes_sent, flags, http,
 *           request_items, response_items)
 *   appends the line to the list ``out`` and returns True; it returns False, appending
 *   nothing, when a value is not a latin-1 str (or an int beyond 64 bits), which the Python
 *   renderer handles. Header items are lists of (name, value) tuples, or None.
 *
 * Only the event loop calls a program (the GIL also serializes callers); its per-second
 * START_TIME cache is therefore unlocked.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>

/* format.py's kinds and header sources (_K_*, _SRC_*). */
enum { K_HEADER = 0, K_REQ = 1, K_STR = 2, K_INT = 3, K_FLAGS = 4, K_RESP = 5, K_START = 6 };
enum { SRC_HEADER = 0, SRC_NONE = -1, SRC_METHOD = -2, SRC_PATH = -3, SRC_AUTHORITY = -4,
       SRC_SCHEME = -5 };

#define N_STR_FIELDS 11 /* format.py's _F_METHOD .. _F_SNI */
#define N_INT_FIELDS 4  /* _F_STATUS .. _F_BYTES_SENT */
/* Positions in the call's arguments. */
#define A_OUT 0
#define A_START 1
#define A_STR0 2
#define A_INT0 (A_STR0 + N_STR_FIELDS)
#define A_FLAGS (A_INT0 + N_INT_FIELDS)
#define A_HTTP (A_FLAGS + 1)
#define A_REQUEST (A_HTTP + 1)
#define A_RESPONSE (A_REQUEST + 1)
#define N_ARGS (A_RESPONSE + 1)
#define F_METHOD 0
#define F_PATH 1
#define F_AUTHORITY 2
#define F_PEER_URI_SAN 9
#define F_SNI 10
#define F_STATUS 0

/* A latin-1 str's bytes (the str is owned by the op). */
typedef struct {
    const char *p;
    Py_ssize_t n;
    int ascii;
} Lit;

typedef struct {
    int kind, field, main, alt;
    Py_ssize_t max_len;
    PyObject *main_name, *alt_name, *text, *suffix, *missing; /* str (owned) */
    Lit text_lit, suffix_lit, missing_lit;
    PyObject *render, *render_head, *render_tail;             /* callables or NULL (owned) */
    int digits;
    long scale;
    /* START_TIME of a split format: the whole second last rendered and its text. */
    long long second;
    PyObject *head, *tail;
} Op;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Py_ssize_t n;
    Op *ops;
} Program;

/* A growing latin-1 buffer: the line before it becomes a str. */
typedef struct {
    char *p;
    Py_ssize_t len, cap;
    int ascii;
    char local[1024];
} Buf;

static int buf_reserve(Buf *b, Py_ssize_t more) {
    if (b->len + more <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap * 2;
    while (cap < b->len + more)
        cap *= 2;
    char *p;
    if (b->p == b->local) {
        p = PyMem_Malloc(cap);
        if (p != NULL)
            memcpy(p, b->p, b->len);
    } else {
        p = PyMem_Realloc(b->p, cap);
    }
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int buf_put(Buf *b, const char *s, Py_ssize_t n, int ascii) {
    if (b->len + n > b->cap && buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->ascii &= ascii;
    return 0;
}

static inline int buf_put_lit(Buf *b, const Lit *lit) {
    return buf_put(b, lit->p, lit->n, lit->ascii);
}

/* Append the first ``n`` characters of a latin-1 str (all of it when n < 0). */
static inline int buf_put_str(Buf *b, PyObject *s, Py_ssize_t n) {
    Py_ssize_t len = PyUnicode_GET_LENGTH(s);
    if (n < 0 || n > len)
        n = len;
    int ascii = PyUnicode_IS_ASCII(s);
    if (!ascii && n < len) {
        /* A prefix of a non-ASCII str may itself be ASCII: check what is copied. */
        const Py_UCS1 *d = PyUnicode_1BYTE_DATA(s);
        ascii = 1;
        for (Py_ssize_t i = 0; i < n; i++)
            if (d[i] >= 128) {
                ascii = 0;
                break;
            }
    }
    return buf_put(b, (const char *)PyUnicode_1BYTE_DATA(s), n, ascii);
}

/* The decimal digits of ``v`` (no sign), right-aligned in ``end``'s buffer, at least
 * ``width`` of them (zero-padded); returns where they start. (snprintf costs about 700
 * instructions a number.) */
static char *digits_of(unsigned long long v, int width, char *end) {
    char *p = end;
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
        width--;
    } while (v != 0);
    while (width-- > 0)
        *--p = '0';
    return p;
}

static int buf_put_int(Buf *b, long long v) {
    char tmp[24];
    char *end = tmp + sizeof tmp;
    char *p = digits_of(v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v, 1, end);
    if (v < 0)
        *--p = '-';
    return buf_put(b, p, end - p, 1);
}

/* Whether ``o`` is a str this module copies bytewise (latin-1 storage). */
static inline int latin1(PyObject *o) {
    return PyUnicode_Check(o) && PyUnicode_KIND(o) == PyUnicode_1BYTE_KIND;
}

static inline int str_eq(PyObject *a, PyObject *b) {
    if (a == b)
        return 1;
    if (!PyUnicode_Check(a))
        return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    return n == PyUnicode_GET_LENGTH(b) && PyUnicode_KIND(a) == PyUnicode_KIND(b)
           && memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), n * PyUnicode_KIND(a)) == 0;
}

/* The first value of header ``name`` in ``items`` (a list of (name, value) tuples, or
 * None); NULL when absent. Borrowed. *bad is set when an item is not such a tuple. */
static PyObject *first_value(PyObject *items, PyObject *name, int *bad) {
    if (items == Py_None)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *kv = PyList_GET_ITEM(items, i);
        if (!PyTuple_Check(kv) || PyTuple_GET_SIZE(kv) != 2) {
            *bad = 1;
            return NULL;
        }
        if (str_eq(PyTuple_GET_ITEM(kv, 0), name))
            return PyTuple_GET_ITEM(kv, 1);
    }
    return NULL;
}

/* The arguments of one call, and whether a value is not ours to render (``bad``: the
 * Python renderer then does the line). */
typedef struct {
    PyObject *const *args;
    int bad;
} Line;

/* ``s`` unless it is NULL or "" (a value that is not a str is kept: put_value refuses it). */
static PyObject *nonempty(PyObject *s) {
    if (s == NULL || (PyUnicode_Check(s) && PyUnicode_GET_LENGTH(s) == 0))
        return NULL;
    return s;
}

static PyObject *s_https, *s_http, *s_status;

/* format.py's _request_source: a str (borrowed) or NULL when not available. */
static PyObject *request_source(Line *line, int source, PyObject *name) {
    PyObject *const *a = line->args;
    switch (source) {
    case SRC_HEADER: {
        PyObject *items = a[A_REQUEST];
        return nonempty(first_value(items, name, &line->bad));
    }
    case SRC_METHOD:
        return nonempty(a[A_STR0 + F_METHOD]);
    case SRC_PATH:
        return nonempty(a[A_STR0 + F_PATH]);
    case SRC_AUTHORITY:
        return nonempty(a[A_STR0 + F_AUTHORITY]);
    case SRC_SCHEME:
        if (!PyObject_IsTrue(a[A_HTTP]))
            return NULL;
        return (PyUnicode_GET_LENGTH(a[A_STR0 + F_PEER_URI_SAN]) > 0
                || PyUnicode_GET_LENGTH(a[A_STR0 + F_SNI]) > 0)
                   ? s_https
                   : s_http;
    default:
        return NULL;
    }
}

/* format.py's _response_header: *out is a new reference to the value of response header
 * ``name`` (":status": the response code's text), or NULL when it is not available or "".
 * Returns -1 with an exception set, else 0 (``line->bad`` set for an item that is not a
 * (name, value) tuple or a code beyond 64 bits). */
static int response_value(Line *line, PyObject *name, PyObject **out) {
    *out = NULL;
    PyObject *items = line->args[A_RESPONSE];
    if (items == Py_None)
        return 0;
    if (str_eq(name, s_status)) {
        int overflow = 0;
        long long code = PyLong_AsLongLongAndOverflow(line->args[A_INT0 + F_STATUS], &overflow);
        if (code == -1 && PyErr_Occurred())
            return -1;
        if (overflow)
            line->bad = 1;
        else if (code != 0 && (*out = PyUnicode_FromFormat("%lld", code)) == NULL)
            return -1;
        return 0;
    }
    Py_ssize_t n = PyList_GET_SIZE(items);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *kv = PyList_GET_ITEM(items, i);
        if (!PyTuple_Check(kv) || PyTuple_GET_SIZE(kv) != 2) {
            line->bad = 1;
            return 0;
        }
        if (str_eq(PyTuple_GET_ITEM(kv, 0), name)) {
            PyObject *v = nonempty(PyTuple_GET_ITEM(kv, 1));
            *out = v == NULL ? NULL : Py_NewRef(v);
            return 0;
        }
    }
    return 0;
}

/* Append ``text + value[:max_len] + suffix``, or ``missing`` when value is NULL or cut to
 * nothing (max_len 0), as format.py's _request_text and _response_text. */
static inline int put_value(Buf *b, Line *line, Op *op, PyObject *v, Py_ssize_t max_len) {
    if (v == NULL || max_len == 0)
        return buf_put_lit(b, &op->missing_lit);
    if (!latin1(v)) {
        line->bad = 1;
        return 0;
    }
    if (buf_put_lit(b, &op->text_lit) < 0 || buf_put_str(b, v, max_len) < 0)
        return -1;
    return buf_put_lit(b, &op->suffix_lit);
}

static int put_start(Buf *b, Line *line, Op *op, PyObject *t_obj) {
    double t = PyFloat_AsDouble(t_obj);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if (buf_put_lit(b, &op->text_lit) < 0)
        return -1;
    if (op->render_head == NULL) {
        PyObject *s = PyObject_CallOneArg(op->render, t_obj);
        if (s == NULL)
            return -1;
        int rc = 0;
        if (latin1(s))
            rc = buf_put_str(b, s, -1);
        else
            line->bad = 1;
        Py_DECREF(s);
        if (rc < 0)
            return -1;
        return buf_put_lit(b, &op->suffix_lit);
    }
    /* As _StartTime._micros: the whole second (int() truncates), then the fraction. */
    long long whole = (long long)t;
    if (whole != op->second || op->head == NULL) {
        PyObject *w = PyLong_FromLongLong(whole);
        if (w == NULL)
            return -1;
        PyObject *head = PyObject_CallOneArg(op->render_head, w);
        PyObject *tail = head == NULL ? NULL : PyObject_CallOneArg(op->render_tail, w);
        Py_DECREF(w);
        if (tail == NULL) {
            Py_XDECREF(head);
            return -1;
        }
        if (!latin1(head) || !latin1(tail)) {
            Py_DECREF(head);
            Py_DECREF(tail);
            line->bad = 1;
            return 0;
        }
        Py_XSETREF(op->head, head);
        Py_XSETREF(op->tail, tail);
        op->second = whole;
    }
    long long micros = (long long)((t - (double)whole) * 1000000.0 + 0.5);
    if (micros > 999999)
        micros = 999999;
    if (buf_put_str(b, op->head, -1) < 0)
        return -1;
    /* As _StartTime._digits: ``digits`` of them, from the microseconds (zeros after 6). */
    char digits[16];
    char *end = digits + 6;
    char *p = digits_of((unsigned long long)(op->digits <= 6 ? micros / op->scale : micros),
                        op->digits <= 6 ? op->digits : 6, end);
    for (int i = 6; i < op->digits; i++)
        *end++ = '0';
    if (buf_put(b, p, end - p, 1) < 0 || buf_put_str(b, op->tail, -1) < 0)
        return -1;
    return buf_put_lit(b, &op->suffix_lit);
}

static int render_op(Buf *b, Line *line, Op *op) {
    PyObject *const *a = line->args;
    switch (op->kind) {
    case K_INT: {
        PyObject *o = a[A_INT0 + op->field];
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (overflow) {
            line->bad = 1;
            return 0;
        }
        if (buf_put_lit(b, &op->text_lit) < 0 || buf_put_int(b, v) < 0)
            return -1;
        return buf_put_lit(b, &op->suffix_lit);
    }
    case K_START:
        return put_start(b, line, op, a[A_START]);
    case K_STR:
        return put_value(b, line, op, nonempty(a[A_STR0 + op->field]), -1);
    case K_FLAGS:
        return put_value(b, line, op, nonempty(a[A_FLAGS]), -1);
    case K_HEADER:
        return put_value(b, line, op, nonempty(first_value(a[A_REQUEST], op->main_name,
                                                           &line->bad)), -1);
    case K_REQ: {
        PyObject *v = request_source(line, op->main, op->main_name);
        if (v == NULL && op->alt != SRC_NONE)
            v = request_source(line, op->alt, op->alt_name);
        return put_value(b, line, op, v, op->max_len);
    }
    case K_RESP: {
        /* As _response_text: the main header, else the alternative. */
        PyObject *v;
        if (response_value(line, op->main_name, &v) < 0)
            return -1;
        if (v == NULL && !line->bad && PyUnicode_GET_LENGTH(op->alt_name) > 0
            && response_value(line, op->alt_name, &v) < 0)
            return -1;
        int rc = put_value(b, line, op, v, op->max_len);
        Py_XDECREF(v);
        return rc;
    }
    default:
        line->bad = 1;
        return 0;
    }
}

static int check_args(PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != N_ARGS) {
        PyErr_Format(PyExc_TypeError, "Program() takes %d arguments (%zd given)", N_ARGS, nargs);
        return -1;
    }
    if (!PyList_Check(args[A_OUT])) {
        PyErr_SetString(PyExc_TypeError, "out must be a list");
        return -1;
    }
    for (int i = A_REQUEST; i <= A_RESPONSE; i++)
        if (args[i] != Py_None && !PyList_Check(args[i])) {
            PyErr_SetString(PyExc_TypeError, "header items must be a list or None");
            return -1;
        }
    return 0;
}

static PyObject *program_call(PyObject *self, PyObject *const *args, size_t nargsf,
                              PyObject *kwnames) {
    Program *prog = (Program *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        PyErr_SetString(PyExc_TypeError, "Program() takes no keyword arguments");
        return NULL;
    }
    if (check_args(args, nargs) < 0)
        return NULL;
    /* The str fields the scheme reads must be str (the others are checked where used). */
    if (!PyUnicode_Check(args[A_STR0 + F_PEER_URI_SAN]) || !PyUnicode_Check(args[A_STR0 + F_SNI]))
        Py_RETURN_FALSE;
    Line line;
    line.args = args;
    line.bad = 0;
    Buf b;
    b.p = b.local;
    b.len = 0;
    b.cap = sizeof b.local;
    b.ascii = 1;
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < prog->n && !line.bad; i++)
        if (render_op(&b, &line, &prog->ops[i]) < 0)
            goto done;
    if (line.bad) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    PyObject *s = PyUnicode_New(b.len, b.ascii ? 127 : 255);
    if (s == NULL)
        goto done;
    memcpy(PyUnicode_1BYTE_DATA(s), b.p, b.len);
    int rc = PyList_Append(args[A_OUT], s);
    Py_DECREF(s);
    if (rc == 0)
        result = Py_NewRef(Py_True);
done:
    if (b.p != b.local)
        PyMem_Free(b.p);
    return result;
}

static void clear_op(Op *op) {
    Py_CLEAR(op->main_name);
    Py_CLEAR(op->alt_name);
    Py_CLEAR(op->text);
    Py_CLEAR(op->suffix);
    Py_CLEAR(op->missing);
    Py_CLEAR(op->render);
    Py_CLEAR(op->render_head);
    Py_CLEAR(op->render_tail);
    Py_CLEAR(op->head);
    Py_CLEAR(op->tail);
}

static int program_clear(PyObject *self) {
    Program *prog = (Program *)self;
    for (Py_ssize_t i = 0; i < prog->n; i++)
        clear_op(&prog->ops[i]);
    return 0;
}

static int program_traverse(PyObject *self, visitproc visit, void *arg) {
    Program *prog = (Program *)self;
    for (Py_ssize_t i = 0; i < prog->n; i++) {
        Py_VISIT(prog->ops[i].render);
        Py_VISIT(prog->ops[i].render_head);
        Py_VISIT(prog->ops[i].render_tail);
    }
    return 0;
}

static void program_dealloc(PyObject *self) {
    Program *prog = (Program *)self;
    PyObject_GC_UnTrack(self);
    program_clear(self);
    PyMem_Free(prog->ops);
    Py_TYPE(self)->tp_free(self);
}

static int take_str(PyObject *item, int i, PyObject **slot, const char *what) {
    PyObject *o = PyTuple_GET_ITEM(item, i);
    if (!latin1(o)) {
        PyErr_Format(PyExc_ValueError, "%s must be a latin-1 str", what);
        return -1;
    }
    *slot = Py_NewRef(o);
    return 0;
}

static void set_lit(Lit *lit, PyObject *s) {
    lit->p = (const char *)PyUnicode_1BYTE_DATA(s);
    lit->n = PyUnicode_GET_LENGTH(s);
    lit->ascii = PyUnicode_IS_ASCII(s);
}

static int take_callable(PyObject *item, int i, PyObject **slot) {
    PyObject *o = PyTuple_GET_ITEM(item, i);
    if (o == Py_None) {
        *slot = NULL;
        return 0;
    }
    if (!PyCallable_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "a START_TIME renderer must be callable or None");
        return -1;
    }
    *slot = Py_NewRef(o);
    return 0;
}

static int take_int(PyObject *item, int i, long *out) {
    long v = PyLong_AsLong(PyTuple_GET_ITEM(item, i));
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

static int compile_op(Op *op, PyObject *item) {
    long kind, field, main, alt, max_len, digits;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 14) {
        PyErr_SetString(PyExc_TypeError, "an op must be a tuple of 14 items");
        return -1;
    }
    if (take_int(item, 0, &kind) < 0 || take_int(item, 1, &field) < 0
        || take_int(item, 2, &main) < 0 || take_int(item, 4, &alt) < 0
        || take_int(item, 6, &max_len) < 0 || take_int(item, 13, &digits) < 0)
        return -1;
    if (kind < K_HEADER || kind > K_START) {
        PyErr_Format(PyExc_ValueError, "kind %ld is not rendered here", kind);
        return -1;
    }
    if ((kind == K_STR && (field < 0 || field >= N_STR_FIELDS))
        || (kind == K_INT && (field < 0 || field >= N_INT_FIELDS))) {
        PyErr_Format(PyExc_ValueError, "field %ld out of range for kind %ld", field, kind);
        return -1;
    }
    if (kind == K_START && (digits < 0 || digits > 9)) {
        PyErr_Format(PyExc_ValueError, "START_TIME digits %ld out of range", digits);
        return -1;
    }
    op->kind = (int)kind;
    op->field = (int)field;
    op->main = (int)main;
    op->alt = (int)alt;
    op->max_len = max_len;
    op->digits = (int)digits;
    op->scale = 1;
    for (long d = digits; d < 6; d++)
        op->scale *= 10;
    op->second = -1;
    if (take_str(item, 3, &op->main_name, "main_name") < 0
        || take_str(item, 5, &op->alt_name, "alt_name") < 0
        || take_str(item, 7, &op->text, "text") < 0
        || take_str(item, 8, &op->suffix, "suffix") < 0
        || take_str(item, 9, &op->missing, "missing") < 0
        || take_callable(item, 10, &op->render) < 0
        || take_callable(item, 11, &op->render_head) < 0
        || take_callable(item, 12, &op->render_tail) < 0)
        return -1;
    set_lit(&op->text_lit, op->text);
    set_lit(&op->suffix_lit, op->suffix);
    set_lit(&op->missing_lit, op->missing);
    if (kind == K_START) {
        if (op->render_head == NULL ? op->render == NULL : op->render_tail == NULL) {
            PyErr_SetString(PyExc_ValueError,
                            "START_TIME needs render, or render_head and render_tail");
            return -1;
        }
        if (op->render_head != NULL && digits < 1) {
            PyErr_SetString(PyExc_ValueError, "a split START_TIME needs 1 to 9 digits");
            return -1;
        }
    }
    return 0;
}

static PyObject *program_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *ops;
    if (!PyArg_ParseTuple(args, "O:Program", &ops))
        return NULL;
    PyObject *seq = PySequence_Fast(ops, "ops must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Program *prog = (Program *)type->tp_alloc(type, 0);
    if (prog == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    prog->vectorcall = program_call;
    prog->ops = PyMem_Calloc(n ? n : 1, sizeof(Op));
    if (prog->ops == NULL) {
        Py_DECREF(seq);
        Py_DECREF(prog);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        prog->n = i + 1; /* what dealloc clears */
        if (compile_op(&prog->ops[i], PySequence_Fast_GET_ITEM(seq, i)) < 0) {
            Py_DECREF(seq);
            Py_DECREF(prog);
            return NULL;
        }
    }
    prog->n = n;
    Py_DECREF(seq);
    return (PyObject *)prog;
}

static PyTypeObject ProgramType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ubimesh.proxy.access_log._textline.Program",
    .tp_basicsize = sizeof(Program),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A compiled text access-log format (see the module's contract).",
    .tp_new = program_new,
    .tp_dealloc = program_dealloc,
    .tp_traverse = program_traverse,
    .tp_clear = program_clear,
    .tp_vectorcall_offset = offsetof(Program, vectorcall),
    .tp_call = PyVectorcall_Call,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ubimesh.proxy.access_log._textline",
    .m_doc = "Text access-log lines in one pass (format.py's renderer, in C).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__textline(void) {
    if (PyType_Ready(&ProgramType) < 0)
        return NULL;
    s_https = PyUnicode_InternFromString("https");
    s_http = PyUnicode_InternFromString("http");
    s_status = PyUnicode_InternFromString(":status");
    if (s_https == NULL || s_http == NULL || s_status == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* The argument count of a call (the tests build their calls with it). */
    if (PyModule_AddIntConstant(m, "N_ARGS", N_ARGS) < 0
        || PyModule_AddObjectRef(m, "Program", (PyObject *)&ProgramType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
