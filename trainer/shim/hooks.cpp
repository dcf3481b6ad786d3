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

// Drops `t`'s accumulated .grad (set to none, as torch's zero_grad(set_to_none=True)): the
// trainer takes gradients through the hooks, so nothing should accumulate beside them.
void ferrun_clear_grad(at::Tensor* t) {
  try {
    t->mutable_grad().reset();
  } catch (...) {
  }
}

}  // extern "C"
