"""Pixel losses between a decoded prediction and its ground truth, reduced to one value per image."""
import torch


def per_image_loss(x_hat: torch.Tensor, x: torch.Tensor, loss_type: str = "l2", eps: float = 1e-3) -> torch.Tensor:
    """Mean over channels and pixels of the chosen error; inputs ``(N, C, H, W)`` (or ``(C, H, W)``), output ``(N,)``.

    ``l2``: squared error; ``l1``: absolute error; ``charbonnier``: ``sqrt(d^2 + eps^2) - eps`` (0 at d = 0).
    """
    d = x_hat.float() - x.float()
    if loss_type == "l2":
        e = d.square()
    elif loss_type == "l1":
        e = d.abs()
    elif loss_type == "charbonnier":
        e = torch.sqrt(d.square() + eps * eps) - eps
    else:
        raise ValueError(f"unknown pixel loss type {loss_type!r}; allowed: 'l2', 'l1', 'charbonnier'")
    if e.dim() == 3:
        return e.mean().reshape(1)
    return e.flatten(1).mean(1)
