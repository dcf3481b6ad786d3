//! Optimizers on f32 shards: SGD (momentum, Nesterov, weight decay) and AdamW (bias correction,
//! decoupled weight decay), with torch's semantics (`torch.optim.SGD`, `torch.optim.AdamW`).
//!
//! # Speed
//! Each update is one pass over zipped slices with every per-step constant hoisted and no
//! branch inside the loop, so the compiler vectorizes it; [`plain_update`] is the same
//! arithmetic written the obvious way (an element at a time, the optimizer matched per element)
//! for `ferrun-bench zero` to measure against.

/// An optimizer and its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Optimizer {
    /// `torch.optim.SGD` (dampening 0).
    Sgd {
        /// Learning rate.
        lr: f32,
        /// Momentum factor (0: none, and no state).
        momentum: f32,
        /// Nesterov momentum.
        nesterov: bool,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
    },
    /// `torch.optim.AdamW`.
    AdamW {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Added to the denominator.
        eps: f32,
        /// Decoupled weight decay.
        weight_decay: f32,
    },
}

impl Optimizer {
    /// AdamW with torch's defaults at `lr` (betas 0.9, 0.999, eps 1e-8, weight decay 0.01).
    pub fn adamw(lr: f32) -> Self {
        Self::AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }

    /// SGD with momentum `momentum` at `lr`.
    pub fn sgd(lr: f32, momentum: f32) -> Self {
        Self::Sgd {
            lr,
            momentum,
            nesterov: false,
            weight_decay: 0.0,
        }
    }

    /// f32 state buffers per parameter element (AdamW: m and v; SGD with momentum: one).
    pub fn state_slots(&self) -> usize {
        match *self {
            Self::Sgd { momentum, .. } => usize::from(momentum != 0.0),
            Self::AdamW { .. } => 2,
        }
    }

    /// A name for tables and checkpoints.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sgd { .. } => "sgd",
            Self::AdamW { .. } => "adamw",
        }
    }
}

/// Updates `params` from `grads` (already averaged, unscaled and clipped) at step `step`
/// (1-based); `state` holds [`Optimizer::state_slots`] buffers as long as `params`.
pub fn update(
    opt: &Optimizer,
    step: u64,
    params: &mut [f32],
    grads: &[f32],
    state: &mut [&mut [f32]],
) {
    let n = params.len();
    debug_assert!(grads.len() == n && state.iter().all(|s| s.len() == n));
    match *opt {
        Optimizer::Sgd {
            lr,
            momentum,
            nesterov,
            weight_decay: wd,
        } => match state {
            [] => {
                for (p, &g) in params.iter_mut().zip(grads) {
                    *p -= lr * (g + wd * *p);
                }
            }
            [buf, ..] => {
                for ((p, &g), b) in params.iter_mut().zip(grads).zip(buf.iter_mut()) {
                    let g = g + wd * *p;
                    *b = momentum * *b + g;
                    let d = if nesterov { g + momentum * *b } else { *b };
                    *p -= lr * d;
                }
            }
        },
        Optimizer::AdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } => {
            let [m, v, ..] = state else {
                return;
            };
            let (bc1, bc2) = bias_corrections(beta1, beta2, step);
            let step_size = lr / bc1;
            let inv_sqrt_bc2 = 1.0 / bc2.sqrt();
            let decay = 1.0 - lr * weight_decay;
            let (one_b1, one_b2) = (1.0 - beta1, 1.0 - beta2);
            for (((p, &g), m), v) in params
                .iter_mut()
                .zip(grads)
                .zip(m.iter_mut())
                .zip(v.iter_mut())
            {
                *m = beta1 * *m + one_b1 * g;
                *v = beta2 * *v + one_b2 * g * g;
                let denom = v.sqrt() * inv_sqrt_bc2 + eps;
                *p = *p * decay - step_size * *m / denom;
            }
        }
    }
}

fn bias_corrections(beta1: f32, beta2: f32, step: u64) -> (f32, f32) {
    let t = i32::try_from(step).unwrap_or(i32::MAX);
    (1.0 - beta1.powi(t), 1.0 - beta2.powi(t))
}

/// [`update`] written the obvious way: an element at a time through indices, the optimizer
/// matched for each element. The same results; for measuring [`update`] against.
pub fn plain_update(
    opt: &Optimizer,
    step: u64,
    params: &mut [f32],
    grads: &[f32],
    state: &mut [&mut [f32]],
) {
    for i in 0..params.len() {
        match *opt {
            Optimizer::Sgd {
                lr,
                momentum,
                nesterov,
                weight_decay,
            } => {
                let g = grads[i] + weight_decay * params[i];
                if state.is_empty() {
                    params[i] -= lr * g;
                } else {
                    state[0][i] = momentum * state[0][i] + g;
                    let d = if nesterov {
                        g + momentum * state[0][i]
                    } else {
                        state[0][i]
                    };
                    params[i] -= lr * d;
                }
            }
            Optimizer::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let (bc1, bc2) = bias_corrections(beta1, beta2, step);
                let g = grads[i];
                state[0][i] = beta1 * state[0][i] + (1.0 - beta1) * g;
                state[1][i] = beta2 * state[1][i] + (1.0 - beta2) * g * g;
                let denom = state[1][i].sqrt() * (1.0 / bc2.sqrt()) + eps;
                params[i] =
                    params[i] * (1.0 - lr * weight_decay) - (lr / bc1) * state[0][i] / denom;
            }
        }
    }
}
