// A thin C layer over libtorch's own distributed engine (c10d): stores, Gloo/NCCL process groups
// and four collectives. Everything here runs inside `guarded`, which turns any C++ exception into
// an error string, so nothing ever unwinds into Rust. Argument checks that name user inputs live in
// the Rust wrapper (src/pg.rs); this file only forwards to c10d.

#include "dist_shim.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#ifdef USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

struct udist_store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct udist_pg {
  c10::intrusive_ptr<c10d::Backend> backend;
  int world_size;
  // Gloo has no AVG reduction: such groups sum and divide.
  bool native_avg;
};

namespace {

void set_error(char** err, const std::string& msg) {
  if (err == nullptr) return;
  char* copy = static_cast<char*>(std::malloc(msg.size() + 1));
  if (copy == nullptr) return;
  std::memcpy(copy, msg.c_str(), msg.size() + 1);
  *err = copy;
}

template <typename F>
int guarded(char** err, F&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    // c10's full what() carries a C++ backtrace; the short form is what a user needs.
    set_error(err, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(err, e.what());
  } catch (...) {
    set_error(err, "unknown C++ exception");
  }
  return -1;
}

at::Tensor& tensor(udist_tensor t) { return *static_cast<at::Tensor*>(t); }

void wait(const c10::intrusive_ptr<c10d::Work>& work) {
  // wait() rethrows the collective's error (peer gone, timeout) as an exception.
  work->wait();
}

}  // namespace

extern "C" {

int udist_has_nccl(void) {
#ifdef USE_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

void udist_free_error(char* err) { std::free(err); }

int udist_tcp_store_new(const char* host, uint16_t port, int is_server, int world_size,
                        int64_t timeout_ms, udist_store** out, uint16_t* bound_port, char** err) {
  return guarded(err, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    opts.numWorkers = static_cast<std::size_t>(world_size);
    opts.waitWorkers = true;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    if (bound_port != nullptr) *bound_port = store->getPort();
    *out = new udist_store{store};
  });
}

int udist_file_store_new(const char* path, int world_size, int64_t timeout_ms, udist_store** out,
                         char** err) {
  return guarded(err, [&] {
    auto store = c10::make_intrusive<c10d::FileStore>(std::string(path), world_size);
    store->setTimeout(std::chrono::milliseconds(timeout_ms));
    *out = new udist_store{store};
  });
}

void udist_store_free(udist_store* store) {
  try {
    delete store;
  } catch (...) {
  }
}

int udist_pg_new(udist_store* store, int backend, int rank, int world_size, int64_t timeout_ms,
                 int device_index, const char* hostname, udist_pg** out, char** err) {
  return guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    // Own key space: under torchrun the store is its agent's, shared with its rendezvous keys.
    c10::intrusive_ptr<c10d::Store> prefixed =
        c10::make_intrusive<c10d::PrefixStore>("unclip_dist", store->store);
    if (backend == UDIST_GLOO) {
#ifndef USE_C10D_GLOO
      (void)hostname;
      throw std::runtime_error(
          "this build has no Gloo backend: gloo's headers (Debian's libgloo-dev) were not found "
          "when unclip-dist was built; install them (`make setup` does) and rebuild");
#else
      c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> opts;
      if (hostname != nullptr) {
        opts = c10d::ProcessGroupGloo::Options::create(timeout);
        opts->devices.push_back(
            c10d::ProcessGroupGloo::createDeviceForHostname(std::string(hostname)));
      } else {
        opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
      }
      auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, world_size, opts);
      *out = new udist_pg{pg, world_size, false};
      return;
#endif
    }
    if (backend == UDIST_NCCL) {
#ifdef USE_C10D_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, world_size, opts);
      if (device_index >= 0) {
        pg->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index)));
      }
      *out = new udist_pg{pg, world_size, true};
      return;
#else
      (void)device_index;
      throw std::runtime_error(
          "this build has no NCCL backend (libtorch_cuda was not found when unclip-dist was built)");
#endif
    }
    throw std::runtime_error("unknown backend id " + std::to_string(backend));
  });
}

void udist_pg_free(udist_pg* pg) {
  try {
    delete pg;
  } catch (...) {
  }
}

int udist_all_reduce(udist_pg* pg, udist_tensor t, int op, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> tensors{tensor(t)};
    c10d::AllreduceOptions opts;
    bool divide = false;
    switch (op) {
      case UDIST_SUM:
        opts.reduceOp = c10d::ReduceOp::SUM;
        break;
      case UDIST_AVG:
        if (pg->native_avg) {
          opts.reduceOp = c10d::ReduceOp::AVG;
        } else {
          opts.reduceOp = c10d::ReduceOp::SUM;
          divide = true;
        }
        break;
      case UDIST_MIN:
        opts.reduceOp = c10d::ReduceOp::MIN;
        break;
      case UDIST_MAX:
        opts.reduceOp = c10d::ReduceOp::MAX;
        break;
      default:
        throw std::runtime_error("unknown reduction id " + std::to_string(op));
    }
    wait(pg->backend->allreduce(tensors, opts));
    if (divide) tensors[0].div_(pg->world_size);
  });
}

int udist_broadcast(udist_pg* pg, udist_tensor t, int root, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> tensors{tensor(t)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    wait(pg->backend->broadcast(tensors, opts));
  });
}

int udist_all_gather(udist_pg* pg, udist_tensor* outputs, int n_outputs, udist_tensor input,
                     char** err) {
  return guarded(err, [&] {
    std::vector<std::vector<at::Tensor>> outs(1);
    for (int i = 0; i < n_outputs; ++i) outs[0].push_back(tensor(outputs[i]));
    std::vector<at::Tensor> ins{tensor(input)};
    wait(pg->backend->allgather(outs, ins));
  });
}

int udist_barrier(udist_pg* pg, char** err) {
  return guarded(err, [&] { wait(pg->backend->barrier()); });
}

}  // extern "C"
