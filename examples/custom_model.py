"""Prune your own nn.Module, twice: with the engine's training (``pruning_core.prune``) and in your own
training loop (``pruning_core.plan`` / ``apply``). On scikit-learn's 8x8 digits, on the CPU, in well
under a minute:

    python examples/custom_model.py [--target 0.5] [--epochs 2]

Prints one line per way: the MACs and params before and after, the MAC ratio against the target, and the
test top-1.
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pruning_core
from pruning_core.artifacts.report import Report, headline
from pruning_core.training.engine import NullReporter


class DigitsNet(nn.Module):
    """Your own architecture (not in the zoo): three conv blocks, global pooling, a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.features = nn.Sequential(block(1, 32), block(32, 64), block(64, 64))
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def digits() -> tuple[TensorDataset, TensorDataset]:
    """The digits as (1 x 8 x 8 image in [0, 1], label) datasets, 80 % train, 20 % test."""
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target)
    train, test = train_test_split(range(len(y)), test_size=0.2, stratify=y.numpy(), random_state=0)
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def top1(model: nn.Module, data: TensorDataset) -> float:
    """Test accuracy in percent."""
    model.eval()
    with torch.no_grad():
        images, labels = data.tensors
        return 100.0 * (model(images).argmax(1) == labels).float().mean().item()


def train(model: nn.Module, data: TensorDataset, epochs: int, lr: float = 0.05) -> nn.Module:
    """Your own loop: SGD on the cross-entropy, in train mode (BatchNorm statistics re-estimated)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for images, labels in DataLoader(data, batch_size=64, shuffle=True):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.5, help="remaining MACs / dense MACs")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs before and after pruning")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_data, test_data = digits()
    example = torch.zeros(1, 1, 8, 8)

    # 1. The engine trains: a dense phase, magnitude pruning, fine-tuning, the report.
    out = pruning_core.prune(
        DigitsNet(),
        example,
        train_data,
        test_data,
        method="magnitude",
        target=args.target,
        dense_epochs=args.epochs,
        epochs=args.epochs,
        device="cpu",
        latency=2.0,  # seconds of dense-vs-pruned timing
        reporter=NullReporter(),  # quiet: no progress bars, no line per epoch
    )
    r = out.report
    print(
        f"prune: MACs {r['dense']['macs']:,} -> {r['pruned']['macs']:,} (ratio {r['achieved_macs_ratio']:.3f}, "
        f"target {args.target:g}), params {r['dense']['params']:,} -> {r['pruned']['params']:,}, "
        f"top-1 {r['dense']['top1']:.1f}% -> {r['pruned']['top1']:.1f}%"
    )
    print(f"prune: {headline(Report.model_validate(r))}")
    print(f"prune: the pruned {type(out.model).__name__} scores top-1 {top1(out.model, test_data):.1f}%")

    # 2. Your own loop: train the dense network, plan, apply, fine-tune it yourself.
    dense = train(DigitsNet(), train_data, args.epochs)
    dense_top1 = top1(dense, test_data)
    plan = pruning_core.plan(dense, example, target=args.target)
    small = train(plan.apply(dense), train_data, args.epochs, lr=0.01)
    print(
        f"plan: MACs {plan.macs_before:,} -> {plan.macs_after:,} (ratio {plan.macs_ratio:.3f}, target "
        f"{args.target:g}), params {plan.params_before:,} -> {plan.params_after:,}, top-1 {dense_top1:.1f}% "
        f"-> {top1(small, test_data):.1f}%"
    )


if __name__ == "__main__":
    main()
