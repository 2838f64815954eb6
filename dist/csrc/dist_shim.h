// C interface of the c10d shim (dist_shim.cpp). Mirrored by hand in src/ffi.rs.
//
// Every fallible function returns 0 on success. On failure it returns -1 and, when `err` is not
// null, stores a malloc'd NUL-terminated message there (free it with udist_free_error). No C++
// exception ever leaves these functions.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct udist_store udist_store;
typedef struct udist_pg udist_pg;

// Tensors are tch's `C_tensor`, i.e. `at::Tensor*`.
typedef void* udist_tensor;

enum { UDIST_GLOO = 0, UDIST_NCCL = 1 };
enum { UDIST_SUM = 0, UDIST_AVG = 1, UDIST_MIN = 2, UDIST_MAX = 3 };

int udist_has_nccl(void);
void udist_free_error(char* err);

int udist_tcp_store_new(const char* host, uint16_t port, int is_server, int world_size,
                        int64_t timeout_ms, udist_store** out, uint16_t* bound_port, char** err);
int udist_file_store_new(const char* path, int world_size, int64_t timeout_ms, udist_store** out,
                         char** err);
void udist_store_free(udist_store* store);

// `device_index` is the CUDA device of an NCCL group (ignored by Gloo). `hostname` is the
// address Gloo binds to (null: PyTorch's default device, honouring GLOO_SOCKET_IFNAME).
int udist_pg_new(udist_store* store, int backend, int rank, int world_size, int64_t timeout_ms,
                 int device_index, const char* hostname, udist_pg** out, char** err);
void udist_pg_free(udist_pg* pg);

int udist_all_reduce(udist_pg* pg, udist_tensor tensor, int op, char** err);
int udist_broadcast(udist_pg* pg, udist_tensor tensor, int root, char** err);
// `outputs` holds world_size tensors shaped like `input`.
int udist_all_gather(udist_pg* pg, udist_tensor* outputs, int n_outputs, udist_tensor input,
                     char** err);
int udist_barrier(udist_pg* pg, char** err);

#ifdef __cplusplus
}
#endif
