"""A minimal supervised loop the test suite uses to make small DigitsCNN state dicts for build tests.

Users train with ``edgekit train`` (:mod:`edgekit.train`), which writes run folders.

AdamW with a cosine schedule, seeded, CPU-friendly. Returns the trained module
and its accuracy on the validation split.
"""

from __future__ import annotations

import numpy as np


def train_classifier(model, x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                     epochs: int = 15, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                     on_epoch=None):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(xt) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch_size):
            idx = perm[i : i + batch_size]
            xb = xt[idx]
            # light augmentation: random 1-pixel shifts keep digits recognisable
            shift = torch.randint(-1, 2, (2,), generator=g)
            xb = torch.roll(xb, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, val_x, val_y)
        if on_epoch:
            on_epoch(epoch, loss.item(), acc)
    return model.eval(), evaluate(model, val_x, val_y)


def evaluate(model, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean() * 100.0)
