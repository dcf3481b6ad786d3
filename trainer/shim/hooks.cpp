// The few libtorch calls tch does not bind: gradient hooks (DDP's overlap of backward and
// communication) and clearing a parameter's .grad. tch's C_tensor is a `torch::Tensor*`.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <exception>

extern "C" {

// Called once per parameter per backward with its gradient, as f32 and contiguous; `data` is
// valid only during the call.
typedef void (*ferrun_grad_fn)(void* ctx, size_t index, const float* data, int64_t numel);

static void put_error(char* err, size_t cap, const char* what) {
  if (err != nullptr && cap > 0) {
    std::strncpy(err, what, cap - 1);
    err[cap - 1] = '\0';
  }
}

// Registers `fn(ctx, index, grad)` on `t`'s gradient; returns the hook's handle, or -1 with the
// reason in `err`.
int64_t ferrun_register_grad_hook(at::Tensor* t, ferrun_grad_fn fn, void* ctx, size_t index,
                                  char* err, size_t err_cap) {
  try {
    unsigned handle = t->register_hook([fn, ctx, index](const at::Tensor& grad) {
      at::Tensor g = grad.is_sparse() ? grad.to_dense() : grad;
      g = g.to(at::kFloat).contiguous();
      fn(ctx, index, g.data_ptr<float>(), g.numel());
    });
    return static_cast<int64_t>(handle);
  } catch (const std::exception& e) {
    put_error(err, err_cap, e.what());
    return -1;
  }
}

// Removes a hook registered above; returns 0, or -1 with the reason in `err`.
int ferrun_remove_hook(at::Tensor* t, int64_t handle, char* err, size_t err_cap) {
  try {
    t->remove_hook(static_cast<unsigned>(handle));
    return 0;
  } catch (const std::exception& e) {
    put_error(err, err_cap, e.what());
    return -1;
  }
}

// Called when backward reaches a tensor (before the node that made it runs).
typedef void (*ferrun_reached_fn)(void* ctx, size_t tag);

// Registers `fn(ctx, tag)` to run when `t`'s gradient is computed; the hook lives as long as
// `t`'s autograd node (this step's graph). Returns 0, or -1 with the reason in `err`.
int ferrun_register_reached_hook(at::Tensor* t, ferrun_reached_fn fn, void* ctx, size_t tag,
                                 char* err, size_t err_cap) {
  try {
    t->register_hook([fn, ctx, tag](const at::Tensor&) { fn(ctx, tag); });
    return 0;
  } catch (const std::exception& e) {
    put_error(err, err_cap, e.what());
    return -1;
  }
}

// Gives `t`'s storage `nbytes` of fresh memory (0: frees it), keeping the storage object, so
// that views of it — autograd's saved ones included — see the memory it has when they are
// used (FSDP's `untyped_storage().resize_`). The old contents are not kept.
int ferrun_storage_resize(at::Tensor* t, size_t nbytes, char* err, size_t err_cap) {
  try {
    c10::StorageImpl* s = t->storage().unsafeGetStorageImpl();
    if (nbytes == 0) {
      s->set_data_ptr_noswap(at::DataPtr(nullptr, s->device()));
    } else {
      s->set_data_ptr_noswap(s->allocator()->allocate(nbytes));
    }
    s->set_nbytes(nbytes);
    return 0;
  } catch (const std::exception& e) {
    put_error(err, err_cap, e.what());
    return -1;
  }
}

// Drops `t`'s accumulated .grad (set to none, as torch's zero_grad(set_to_none=True)): the
// trainer takes gradients through the hooks, so nothing should accumulate beside them.
void ferrun_clear_grad(at::Tensor* t) {
  try {
    t->mutable_grad().reset();
  } catch (...) {
  }
}

}  // extern "C"
