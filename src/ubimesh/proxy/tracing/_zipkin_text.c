/* Zipkin v2 JSON spans written into a batch's body as each span finishes (zipkin.py's
 * ZipkinBatch, in C).
 *
 * Why C: writing each span as it finishes lets it be freed with its stream; held in the
 * exporter's queue until its batch of 256 left, and freed with the batch, finished spans had
 * cost about 4 % of the throughput at 100 % sampling in the CPU's caches. Compiled Python
 * writing each span on its own cost 2.3k to 4.7k instructions more than writing a whole
 * batch (three versions measured, bench/README.md); this costs about the same as the batch
 * did (about 5k instructions a span, the copy of about 1 KB included), and the A/B against
 * it is 1.025 (bench/telemetry_cpu.py --corun, 16 rounds).
 *
 * Contract (zipkin.py's span_dict and Span.tag_dict, serialized by orjson, are the source of
 * truth; tests/unit/test_tracing_zipkin_text.py compares the two on random spans):
 *
 *   SpanText(head, zone_part) starts an empty batch. ``head`` is what follows a span's
 *   duration up to the value of ``http.url`` (``,"localEndpoint":{...},"tags":{"node_id":...,
 *   "http.url":"``) and ``zone_part`` the ``,"zone":...`` member or "", both already JSON;
 *   each must be an ASCII str (ValueError otherwise: zipkin.py then writes the batch from
 *   the dicts).
 *
 *   text(trace_id, span_id, parent_id, client, shared, start_us, duration_us, proto, host,
 *        path, method, downstream_cluster, user_agent, http10, peer, request_id,
 *        client_trace_id, request_size, response_size, upstream, status, response_flags,
 *        name)
 *   appends ``orjson.dumps(span_dict(span, endpoint))`` of a span whose tags come from its
 *   record and has no custom tags (after a comma unless it is the first) and returns True.
 *   It returns False, appending nothing, when a str value is not ASCII or would need
 *   escaping (a quote, a backslash, a control character), when an int does not fit 64 bits,
 *   or when an argument has another type; the caller then appends the span's orjson text
 *   with raw(). ``upstream`` is the upstream members, already JSON (zipkin.py's cache); it
 *   only has to be ASCII. Empty ``response_flags`` is written "-", as Span.tag_dict does.
 *
 *   raw(data) appends a span's JSON (bytes) as it is, after a comma unless it is the first.
 *   body() returns the batch as a JSON array (bytes) and empties it. len() is the number of
 *   spans appended since the last body().
 *
 * Only the event loop uses a batch (the GIL also serializes callers). A batch holds no
 * Python object, so it is not tracked by the collector.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum {
    A_TRACE_ID, A_SPAN_ID, A_PARENT_ID, A_CLIENT, A_SHARED, A_START_US, A_DURATION_US,
    A_PROTO, A_HOST, A_PATH, A_METHOD, A_DOWNSTREAM, A_USER_AGENT, A_HTTP10, A_PEER,
    A_REQUEST_ID, A_CLIENT_TRACE_ID, A_REQUEST_SIZE, A_RESPONSE_SIZE, A_UPSTREAM, A_STATUS,
    A_FLAGS, A_NAME, N_ARGS
};

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    char *p;           /* "[" then the spans, comma-separated (PyMem) */
    Py_ssize_t len, cap;
    Py_ssize_t count;  /* spans since the last body() */
    char *head, *zone; /* copies of the constructor's texts (PyMem) */
    Py_ssize_t head_len, zone_len;
} SpanText;

/* A str value as bytes, once checked. */
typedef struct {
    const char *p;
    Py_ssize_t n;
} Val;

/* Whether one of the eight bytes of ``x`` (each below 0x80: the str is ASCII) is one orjson
 * escapes: a control character, a quote or a backslash. Each term is the exact "some byte
 * is below n / is zero" bit trick, so there are no false positives. */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL
static inline int needs_escape8(uint64_t x) {
    uint64_t q = x ^ (ONES * '"'), b = x ^ (ONES * '\\');
    return ((((x - ONES * 0x20) & ~x) | ((q - ONES) & ~q) | ((b - ONES) & ~b)) & HIGHS) != 0;
}

static inline int needs_escape1(unsigned char c) {
    return c < 0x20 || c == '"' || c == '\\';
}

/* An ASCII str's bytes; 0 when ``o`` is not an ASCII str (or, with ``check``, when one of
 * its characters needs escaping). */
static inline int take(PyObject *o, Val *v, int check) {
    if (!PyUnicode_Check(o) || !PyUnicode_IS_ASCII(o))
        return 0;
    const unsigned char *d = PyUnicode_1BYTE_DATA(o);
    Py_ssize_t n = PyUnicode_GET_LENGTH(o);
    if (check) {
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8) {
            uint64_t x;
            memcpy(&x, d + i, 8);
            if (needs_escape8(x))
                return 0;
        }
        for (; i < n; i++)
            if (needs_escape1(d[i]))
                return 0;
    }
    v->p = (const char *)d;
    v->n = n;
    return 1;
}

/* An exact int that fits 64 bits; 0 otherwise (no error left set). */
static inline int take_int(PyObject *o, long long *out) {
    if (!PyLong_CheckExact(o))
        return 0;
#if PY_VERSION_HEX < 0x030C0000
    /* Up to two 30-bit digits (every time and size a span has) read directly: the general
     * conversion costs about 40 instructions a call. */
    Py_ssize_t size = Py_SIZE(o);
    const digit *dg = ((PyLongObject *)o)->ob_digit;
    if (size == 0) {
        *out = 0;
        return 1;
    }
    if (size == 1 || size == -1) {
        *out = size > 0 ? (long long)dg[0] : -(long long)dg[0];
        return 1;
    }
    if (size == 2 || size == -2) {
        long long v = (long long)dg[0] | ((long long)dg[1] << PyLong_SHIFT);
        *out = size > 0 ? v : -v;
        return 1;
    }
#endif
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
}

/* True or False exactly (the compiled caller passes bools); -1 for another object. */
static inline int take_bool(PyObject *o) {
    return o == Py_True ? 1 : o == Py_False ? 0 : -1;
}

static int reserve(SpanText *t, Py_ssize_t more) {
    if (t->len + more <= t->cap)
        return 0;
    Py_ssize_t cap = t->cap;
    while (cap < t->len + more) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    char *p = PyMem_Realloc(t->p, cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    t->p = p;
    t->cap = cap;
    return 0;
}

/* Writers into room already reserved. */
#define PUT_LIT(w, lit) (memcpy((w), (lit), sizeof(lit) - 1), (w) += sizeof(lit) - 1)

/* A value's bytes, 8 at a time: a libc memcpy call costs more than these short values. */
static inline char *put(char *w, const char *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8)
        memcpy(w + i, s + i, 8);
    for (; i < n; i++)
        w[i] = s[i];
    return w + n;
}
#define PUT(w, s, n) ((w) = put((w), (s), (n)))

static const char DIGIT_PAIRS[] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

/* ``v`` in decimal, two digits a division (snprintf costs about 700 instructions). */
static char *put_int(char *w, long long v) {
    char tmp[24];
    char *end = tmp + sizeof tmp;
    char *p = end;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    while (u >= 100) {
        unsigned r = (unsigned)(u % 100);
        u /= 100;
        p -= 2;
        memcpy(p, DIGIT_PAIRS + 2 * r, 2);
    }
    if (u >= 10) {
        p -= 2;
        memcpy(p, DIGIT_PAIRS + 2 * u, 2);
    } else {
        *--p = (char)('0' + u);
    }
    if (v < 0)
        *--p = '-';
    PUT(w, p, end - p);
    return w;
}

/* Room for the constant pieces and ints of a span (at most 476 bytes, counted by hand from
 * text_call), beyond the values' lengths (counted in text_call). */
#define FIXED_MAX 640

static PyObject *text_call(PyObject *self, PyObject *const *args, size_t nargsf,
                           PyObject *kwnames) {
    SpanText *t = (SpanText *)self;
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        PyErr_SetString(PyExc_TypeError, "SpanText() takes no keyword arguments");
        return NULL;
    }
    if (PyVectorcall_NARGS(nargsf) != N_ARGS) {
        PyErr_Format(PyExc_TypeError, "SpanText() takes %d arguments (%zd given)", N_ARGS,
                     PyVectorcall_NARGS(nargsf));
        return NULL;
    }
    Val trace_id, span_id, parent_id, proto, host, path, method, downstream, agent, peer, rid,
        ctid, upstream, flags, name;
    long long start_us, duration_us, request_size, response_size, status;
    int client = take_bool(args[A_CLIENT]), shared = take_bool(args[A_SHARED]),
        http10 = take_bool(args[A_HTTP10]);
    if (client < 0 || shared < 0 || http10 < 0
        || !take(args[A_TRACE_ID], &trace_id, 1) || !take(args[A_SPAN_ID], &span_id, 1)
        || !take(args[A_PARENT_ID], &parent_id, 1) || !take(args[A_PROTO], &proto, 1)
        || !take(args[A_HOST], &host, 1) || !take(args[A_PATH], &path, 1)
        || !take(args[A_METHOD], &method, 1) || !take(args[A_DOWNSTREAM], &downstream, 1)
        || !take(args[A_USER_AGENT], &agent, 1) || !take(args[A_PEER], &peer, 1)
        || !take(args[A_REQUEST_ID], &rid, 1) || !take(args[A_CLIENT_TRACE_ID], &ctid, 1)
        || !take(args[A_UPSTREAM], &upstream, 0) || !take(args[A_FLAGS], &flags, 1)
        || !take(args[A_NAME], &name, 1) || !take_int(args[A_START_US], &start_us)
        || !take_int(args[A_DURATION_US], &duration_us)
        || !take_int(args[A_REQUEST_SIZE], &request_size)
        || !take_int(args[A_RESPONSE_SIZE], &response_size)
        || !take_int(args[A_STATUS], &status))
        Py_RETURN_FALSE;
    if (flags.n == 0) {
        flags.p = "-";
        flags.n = 1;
    }
    Py_ssize_t values = trace_id.n + span_id.n + parent_id.n + proto.n + host.n + path.n
                        + method.n + downstream.n + agent.n + peer.n + rid.n + ctid.n
                        + upstream.n + flags.n + name.n + t->head_len + t->zone_len;
    if (reserve(t, values + FIXED_MAX) < 0)
        return NULL;
    char *w = t->p + t->len;
    if (t->count > 0)
        *w++ = ',';
    PUT_LIT(w, "{\"traceId\":\"");
    PUT(w, trace_id.p, trace_id.n);
    PUT_LIT(w, "\",\"id\":\"");
    PUT(w, span_id.p, span_id.n);
    if (client)
        PUT_LIT(w, "\",\"kind\":\"CLIENT\",\"timestamp\":");
    else
        PUT_LIT(w, "\",\"kind\":\"SERVER\",\"timestamp\":");
    w = put_int(w, start_us);
    PUT_LIT(w, ",\"duration\":");
    w = put_int(w, duration_us);
    PUT(w, t->head, t->head_len);
    PUT(w, proto.p, proto.n);
    PUT_LIT(w, "://");
    PUT(w, host.p, host.n);
    PUT(w, path.p, path.n);
    PUT_LIT(w, "\",\"http.method\":\"");
    PUT(w, method.p, method.n);
    PUT_LIT(w, "\",\"downstream_cluster\":\"");
    PUT(w, downstream.p, downstream.n);
    PUT_LIT(w, "\",\"user_agent\":\"");
    PUT(w, agent.p, agent.n);
    if (http10)
        PUT_LIT(w, "\",\"http.protocol\":\"HTTP/1.0\",\"peer.address\":\"");
    else
        PUT_LIT(w, "\",\"http.protocol\":\"HTTP/1.1\",\"peer.address\":\"");
    PUT(w, peer.p, peer.n);
    *w++ = '"';
    PUT(w, t->zone, t->zone_len);
    if (rid.n) {
        PUT_LIT(w, ",\"guid:x-request-id\":\"");
        PUT(w, rid.p, rid.n);
        *w++ = '"';
    }
    if (ctid.n) {
        PUT_LIT(w, ",\"guid:x-client-trace-id\":\"");
        PUT(w, ctid.p, ctid.n);
        *w++ = '"';
    }
    PUT_LIT(w, ",\"request_size\":\"");
    w = put_int(w, request_size);
    PUT_LIT(w, "\",\"response_size\":\"");
    w = put_int(w, response_size);
    PUT_LIT(w, "\",\"component\":\"proxy\"");
    PUT(w, upstream.p, upstream.n);
    PUT_LIT(w, ",\"http.status_code\":\"");
    w = put_int(w, status);
    PUT_LIT(w, "\",\"response_flags\":\"");
    PUT(w, flags.p, flags.n);
    *w++ = '"';
    /* Envoy marks 5xx, and a stream that ended without a response, as errors. */
    if (status >= 500 || status == 0)
        PUT_LIT(w, ",\"error\":\"true\"");
    *w++ = '}';
    if (name.n) {
        PUT_LIT(w, ",\"name\":\"");
        PUT(w, name.p, name.n);
        *w++ = '"';
    }
    if (parent_id.n) {
        PUT_LIT(w, ",\"parentId\":\"");
        PUT(w, parent_id.p, parent_id.n);
        *w++ = '"';
    }
    if (shared)
        PUT_LIT(w, ",\"shared\":true");
    *w++ = '}';
    t->len = w - t->p;
    t->count++;
    Py_RETURN_TRUE;
}

static PyObject *text_raw(PyObject *self, PyObject *data) {
    SpanText *t = (SpanText *)self;
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "raw() takes bytes");
        return NULL;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (reserve(t, n + 1) < 0)
        return NULL;
    char *w = t->p + t->len;
    if (t->count > 0)
        *w++ = ',';
    memcpy(w, PyBytes_AS_STRING(data), n);
    w += n;
    t->len = w - t->p;
    t->count++;
    Py_RETURN_NONE;
}

static PyObject *text_body(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    SpanText *t = (SpanText *)self;
    if (reserve(t, 1) < 0)
        return NULL;
    t->p[t->len] = ']';
    PyObject *body = PyBytes_FromStringAndSize(t->p, t->len + 1);
    if (body == NULL)
        return NULL;
    t->len = 1; /* the "[" */
    t->count = 0;
    return body;
}

static Py_ssize_t text_length(PyObject *self) {
    return ((SpanText *)self)->count;
}

/* A copy of an ASCII str's bytes (PyMem), or NULL with ValueError. */
static char *copy_ascii(PyObject *o, const char *what, Py_ssize_t *n) {
    if (!PyUnicode_Check(o) || !PyUnicode_IS_ASCII(o)) {
        PyErr_Format(PyExc_ValueError, "%s must be an ASCII str", what);
        return NULL;
    }
    *n = PyUnicode_GET_LENGTH(o);
    char *p = PyMem_Malloc(*n ? *n : 1);
    if (p == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(p, PyUnicode_1BYTE_DATA(o), *n);
    return p;
}

static void text_dealloc(PyObject *self) {
    SpanText *t = (SpanText *)self;
    PyMem_Free(t->p);
    PyMem_Free(t->head);
    PyMem_Free(t->zone);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *text_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *head, *zone;
    static char *names[] = {"head", "zone_part", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:SpanText", names, &head, &zone))
        return NULL;
    SpanText *t = (SpanText *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    t->vectorcall = text_call;
    t->head = copy_ascii(head, "head", &t->head_len);
    if (t->head == NULL)
        goto fail;
    t->zone = copy_ascii(zone, "zone_part", &t->zone_len);
    if (t->zone == NULL)
        goto fail;
    t->cap = 4096;
    t->p = PyMem_Malloc(t->cap);
    if (t->p == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    t->p[0] = '[';
    t->len = 1;
    return (PyObject *)t;
fail:
    Py_DECREF(t);
    return NULL;
}

static PyMethodDef text_methods[] = {
    {"raw", text_raw, METH_O, "Append a span's JSON (bytes) as it is."},
    {"body", text_body, METH_NOARGS, "The batch as a JSON array (bytes); empties it."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods text_as_sequence = {
    .sq_length = text_length,
};

static PyTypeObject SpanTextType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ubimesh.proxy.tracing._zipkin_text.SpanText",
    .tp_basicsize = sizeof(SpanText),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A batch's Zipkin v2 JSON body, written span by span (see the module's contract).",
    .tp_new = text_new,
    .tp_dealloc = text_dealloc,
    .tp_methods = text_methods,
    .tp_as_sequence = &text_as_sequence,
    .tp_vectorcall_offset = offsetof(SpanText, vectorcall),
    .tp_call = PyVectorcall_Call,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ubimesh.proxy.tracing._zipkin_text",
    .m_doc = "Zipkin v2 JSON spans written as they finish (zipkin.py's encoder, in C).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__zipkin_text(void) {
    if (PyType_Ready(&SpanTextType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "SpanText", (PyObject *)&SpanTextType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
