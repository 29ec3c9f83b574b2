/* HTTP/1.1 heads in one pass (codec.py's encode_request_head and encode_response_head, in C).
 *
 * Why C: compiled Python makes a list of four pieces per header line, joins them and encodes
 * the result, about 500 instructions a header line (bench/telemetry_cpu.py --callgrind:
 * the three B3 headers of a traced request cost 1.5k). This measures the lines once and
 * copies them into the bytes object it returns.
 *
 * Contract (codec.py's _encode_request_head and the status line + encode_headers + CRLF are
 * the source of truth; tests/unit/test_http_head.py compares them on random heads):
 *
 *   request_head(method, target, headers) returns
 *   ``f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
 *   + "\r\n"`` encoded as latin-1;
 *   response_head(start, headers) returns the bytes ``start`` (a status line with its CRLF)
 *   followed by the same header lines and the empty line.
 *   Each does so when ``headers`` is a list of (name, value) tuples of str, ``method`` and
 *   ``target`` are str, ``start`` is bytes, and every str is stored one byte a character
 *   (latin-1: what the codec decodes the wire with). Otherwise it returns None and writes
 *   nothing: the caller then runs the Python encoder, which raises what it raises.
 *
 * No Python code runs between the measuring pass and the copying pass, so the list cannot
 * change in between (the GIL is held throughout).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* The length of ``o`` if it is a str of one-byte characters, else -1. */
static inline Py_ssize_t latin1_len(PyObject *o) {
    if (!PyUnicode_Check(o) || !PyUnicode_IS_READY(o) || PyUnicode_KIND(o) != PyUnicode_1BYTE_KIND)
        return -1;
    return PyUnicode_GET_LENGTH(o);
}

static inline char *put(char *p, PyObject *s, Py_ssize_t n) {
    memcpy(p, PyUnicode_1BYTE_DATA(s), (size_t)n);
    return p + n;
}

/* The bytes of ``headers``' lines ("k: v\r\n" each), or -1 when ``headers`` is not a list of
 * (str, str) tuples of one-byte characters. */
static Py_ssize_t lines_len(PyObject *headers) {
    if (!PyList_Check(headers))
        return -1;
    Py_ssize_t total = 0, n = PyList_GET_SIZE(headers);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *kv = PyList_GET_ITEM(headers, i);
        if (!PyTuple_Check(kv) || PyTuple_GET_SIZE(kv) != 2)
            return -1;
        Py_ssize_t k = latin1_len(PyTuple_GET_ITEM(kv, 0));
        Py_ssize_t v = latin1_len(PyTuple_GET_ITEM(kv, 1));
        if (k < 0 || v < 0)
            return -1;
        total += k + 2 + v + 2;
    }
    return total;
}

/* Copy the lines that lines_len measured; returns the end. */
static char *put_lines(char *p, PyObject *headers) {
    Py_ssize_t n = PyList_GET_SIZE(headers);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *kv = PyList_GET_ITEM(headers, i);
        PyObject *k = PyTuple_GET_ITEM(kv, 0), *v = PyTuple_GET_ITEM(kv, 1);
        p = put(p, k, PyUnicode_GET_LENGTH(k));
        *p++ = ':';
        *p++ = ' ';
        p = put(p, v, PyUnicode_GET_LENGTH(v));
        *p++ = '\r';
        *p++ = '\n';
    }
    return p;
}

static int check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t want) {
    if (nargs == want)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, want, nargs);
    return -1;
}

static PyObject *request_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (check_nargs("request_head", nargs, 3) < 0)
        return NULL;
    PyObject *method = args[0], *target = args[1], *headers = args[2];
    Py_ssize_t method_len = latin1_len(method), target_len = latin1_len(target);
    Py_ssize_t lines = lines_len(headers);
    if (method_len < 0 || target_len < 0 || lines < 0)
        Py_RETURN_NONE;
    /* "M T HTTP/1.1\r\n", the lines, "\r\n" */
    PyObject *out = PyBytes_FromStringAndSize(NULL, method_len + 1 + target_len + 11 + lines + 2);
    if (out == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(out);
    p = put(p, method, method_len);
    *p++ = ' ';
    p = put(p, target, target_len);
    memcpy(p, " HTTP/1.1\r\n", 11);
    p = put_lines(p + 11, headers);
    *p++ = '\r';
    *p = '\n';
    return out;
}

static PyObject *response_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (check_nargs("response_head", nargs, 2) < 0)
        return NULL;
    PyObject *start = args[0], *headers = args[1];
    Py_ssize_t lines = lines_len(headers);
    if (!PyBytes_Check(start) || lines < 0)
        Py_RETURN_NONE;
    Py_ssize_t start_len = PyBytes_GET_SIZE(start);
    PyObject *out = PyBytes_FromStringAndSize(NULL, start_len + lines + 2);
    if (out == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(out);
    memcpy(p, PyBytes_AS_STRING(start), (size_t)start_len);
    p = put_lines(p + start_len, headers);
    *p++ = '\r';
    *p = '\n';
    return out;
}

static PyMethodDef methods[] = {
    {"request_head", (PyCFunction)(void (*)(void))request_head, METH_FASTCALL,
     "An HTTP/1.1 request head as latin-1 bytes, or None (see the module's contract)."},
    {"response_head", (PyCFunction)(void (*)(void))response_head, METH_FASTCALL,
     "A response head: the status line, the header lines, CRLF; or None (see the contract)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ubimesh.proxy.http._head",
    .m_doc = "HTTP/1.1 heads in one pass (codec.py's encoders, in C).",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__head(void) { return PyModule_Create(&module_def); }
