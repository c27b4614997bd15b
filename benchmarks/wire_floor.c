/* The wire's two messages per tensor driven from C: what the MPI design costs without Python.
 * Built by benchmarks/wire_floor.py with the mpicc beside python; not part of the package.
 *   send(comm_f, dest, tag, header, address, nbytes): payload (tag + 1) and header (tag), then wait
 *   recv(comm_f, source, tag, header_buf, payload_buf) -> payload bytes: header receive posted,
 *     payload matched by a probe (MPI_Improbe) and received with MPI_Imrecv, then wait
 *   send_message / recv_message: the same, with the header packed / read and the bytes counted
 *     in C (into an int64 array: [header bytes, payload bytes]); Python only builds the tensor
 * Waits spin on MPI_Testall with the GIL released, as MPI's blocking calls do. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <mpi.h>

/* The two messages out and in, as the Transport sends them (called without the GIL). */
static void send_pair(MPI_Comm comm, int dest, int tag, void *header, int header_len, void *payload, int nbytes) {
    MPI_Request requests[2];
    int done = 0;
    MPI_Isend(payload, nbytes, MPI_BYTE, dest, tag + 1, comm, &requests[0]);
    MPI_Isend(header, header_len, MPI_BYTE, dest, tag, comm, &requests[1]);
    while (!done) MPI_Testall(2, requests, &done, MPI_STATUSES_IGNORE);
}

static int recv_pair(MPI_Comm comm, int source, int tag, void *header, int header_len, void *payload) {
    MPI_Request requests[2];
    MPI_Message message;
    MPI_Status status;
    int matched = 0, done = 0, count = 0;
    MPI_Irecv(header, header_len, MPI_BYTE, source, tag, comm, &requests[0]);
    while (!matched) MPI_Improbe(source, tag + 1, comm, &matched, &message, &status);
    MPI_Get_count(&status, MPI_BYTE, &count);
    MPI_Imrecv(payload, count, MPI_BYTE, &message, &requests[1]);
    while (!done) MPI_Testall(2, requests, &done, MPI_STATUSES_IGNORE);
    return count;
}

static PyObject *send(PyObject *self, PyObject *args) {
    int comm_f, dest, tag;
    Py_buffer header;
    unsigned long long address;
    Py_ssize_t nbytes;
    if (!PyArg_ParseTuple(args, "iiiy*Kn", &comm_f, &dest, &tag, &header, &address, &nbytes)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    send_pair(MPI_Comm_f2c(comm_f), dest, tag, header.buf, (int)header.len, (void *)address, (int)nbytes);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&header);
    Py_RETURN_NONE;
}

static PyObject *recv(PyObject *self, PyObject *args) {
    int comm_f, source, tag, count = 0;
    Py_buffer header, payload;
    if (!PyArg_ParseTuple(args, "iiiw*w*", &comm_f, &source, &tag, &header, &payload)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    count = recv_pair(MPI_Comm_f2c(comm_f), source, tag, header.buf, (int)header.len, payload.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&header);
    PyBuffer_Release(&payload);
    return PyLong_FromLong(count);
}

/* send_message(comm_f, dest, tag, (step, dtype, ndim, d0, d1, d2, d3, flag), address, nbytes, counts) */
static PyObject *send_message(PyObject *self, PyObject *args) {
    int comm_f, dest, tag;
    long long h[8];
    unsigned long long address;
    Py_ssize_t nbytes;
    Py_buffer counts;
    if (!PyArg_ParseTuple(args, "iii(LLLLLLLL)Knw*", &comm_f, &dest, &tag, &h[0], &h[1], &h[2], &h[3], &h[4],
                          &h[5], &h[6], &h[7], &address, &nbytes, &counts))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    send_pair(MPI_Comm_f2c(comm_f), dest, tag, h, sizeof h, (void *)address, (int)nbytes);
    Py_END_ALLOW_THREADS
    ((long long *)counts.buf)[0] += sizeof h;
    ((long long *)counts.buf)[1] += nbytes;
    PyBuffer_Release(&counts);
    Py_RETURN_NONE;
}

/* recv_message(comm_f, source, tag, payload_buf, counts) -> (step, dtype, ndim, d0, d1, d2, d3, flag) */
static PyObject *recv_message(PyObject *self, PyObject *args) {
    int comm_f, source, tag, count = 0;
    long long h[8];
    Py_buffer payload, counts;
    if (!PyArg_ParseTuple(args, "iiiw*w*", &comm_f, &source, &tag, &payload, &counts)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    count = recv_pair(MPI_Comm_f2c(comm_f), source, tag, h, sizeof h, payload.buf);
    Py_END_ALLOW_THREADS
    ((long long *)counts.buf)[0] += sizeof h;
    ((long long *)counts.buf)[1] += count;
    PyBuffer_Release(&payload);
    PyBuffer_Release(&counts);
    return Py_BuildValue("(LLLLLLLL)", h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]);
}

static PyMethodDef methods[] = {{"send", send, METH_VARARGS, NULL},
                                {"recv", recv, METH_VARARGS, NULL},
                                {"send_message", send_message, METH_VARARGS, NULL},
                                {"recv_message", recv_message, METH_VARARGS, NULL},
                                {NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "wire_floor_c", NULL, -1, methods};
PyMODINIT_FUNC PyInit_wire_floor_c(void) { return PyModule_Create(&module); }
