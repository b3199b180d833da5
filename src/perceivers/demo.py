"""`make demo` placeholder until the trainer lands: builds each model and runs it on real digits."""

from __future__ import annotations


def main() -> None:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from perceivers import Perceiver, PerceiverIO

    digits = load_digits()
    images = torch.tensor(digits.images[:16, :, :, None] / 16.0, dtype=torch.float32)  # [16, 8, 8, 1]
    model = Perceiver(num_freq_bands=4, depth=2, max_freq=8.0, input_channels=1, num_latents=16,
                      latent_dim=32, num_classes=10)
    print("Perceiver logits", tuple(model(images).shape))
    io = PerceiverIO(depth=2, dim=1, queries_dim=8, logits_dim=10, num_latents=16, latent_dim=32)
    print("PerceiverIO logits", tuple(io(images.flatten(1, 2), queries=torch.randn(1, 8)).shape))
    print("labels", np.asarray(digits.target[:16]))


if __name__ == "__main__":
    main()
