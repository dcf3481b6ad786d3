//! The model the main job trains: a multilayer perceptron (Linear → ReLU, …, Linear), run
//! layer by layer so that a ZeRO stage-3 engine can gather each layer's parameters first.

use tch::nn::{self, Module};
use tch::Tensor;

use ferrun_collective::zero::ParamSpec;

/// A multilayer perceptron.
#[derive(Debug)]
pub struct Mlp {
    layers: Vec<nn::Linear>,
}

impl Mlp {
    /// Layers of `sizes[i] → sizes[i + 1]` under `path` (named `fc0`, `fc1`, …), initialized
    /// as torch's `nn.Linear`.
    pub fn new(path: &nn::Path<'_>, sizes: &[i64]) -> Self {
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| nn::linear(path / format!("fc{i}"), w[0], w[1], Default::default()))
            .collect();
        Self { layers }
    }

    /// Layers.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Every parameter in forward order (`fc0.weight`, `fc0.bias`, `fc1.weight`, …) and its
    /// spec for a shard plan.
    pub fn parameters(&self) -> Vec<(ParamSpec, Tensor)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let mut push = |name: String, t: &Tensor| {
                let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
                out.push((ParamSpec::new(name, &shape), t.shallow_clone()));
            };
            push(format!("fc{i}.weight"), &l.ws);
            if let Some(b) = &l.bs {
                push(format!("fc{i}.bias"), b);
            }
        }
        out
    }

    /// The indices (into [`Mlp::parameters`]) of layer `l`'s parameters.
    pub fn layer_params(&self, l: usize) -> std::ops::Range<usize> {
        let count = |l: &nn::Linear| 1 + usize::from(l.bs.is_some());
        let start: usize = self.layers[..l.min(self.layers.len())]
            .iter()
            .map(count)
            .sum();
        start..start + self.layers.get(l).map_or(0, count)
    }

    /// Layer `l` on `x` (ReLU after every layer but the last).
    pub fn forward_layer(&self, l: usize, x: &Tensor) -> Tensor {
        let y = self.layers[l].forward(x);
        if l + 1 < self.layers.len() {
            y.relu()
        } else {
            y
        }
    }
}
