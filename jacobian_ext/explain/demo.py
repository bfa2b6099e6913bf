"""The demo picture: a small CNN trained for a few seconds on synthetic images whose class is the
orientation of a bar, and the attribution maps of every class for one test image per class, from one call
of explain.integrated_gradients(model, images) (target=None: all classes at once). Signed maps: red pixels
raise that class's score, blue ones lower it. No downloads; needs matplotlib."""
import os

import torch
from torch import nn

from .functions import integrated_gradients

CLASSES = ("horizontal bar", "vertical bar", "diagonal \\", "diagonal /")
SIZE = 24
BAR = 12  # bar length in pixels; bars are 2 pixels wide


def make_images(count: int, generator: torch.Generator):
    """(images [count, 1, SIZE, SIZE], labels): a bright bar of each class's orientation at a random place
    on a noisy background."""
    labels = torch.randint(len(CLASSES), (count,), generator=generator)
    images = 0.25 * torch.randn(count, 1, SIZE, SIZE, generator=generator)
    steps = torch.arange(BAR)
    for index, label in enumerate(labels.tolist()):
        row, col = torch.randint(1, SIZE - BAR - 1, (2,), generator=generator).tolist()
        if label == 0:
            rows, cols = torch.full((BAR,), row + BAR // 2), col + steps
        elif label == 1:
            rows, cols = row + steps, torch.full((BAR,), col + BAR // 2)
        elif label == 2:
            rows, cols = row + steps, col + steps
        else:
            rows, cols = row + steps, col + BAR - 1 - steps
        images[index, 0, rows, cols] += 1.0
        images[index, 0, rows + (label != 1), cols + (label == 1)] += 1.0
    return images, labels


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * (SIZE // 4) ** 2, len(CLASSES)),
    )


def train(steps: int = 600, seed: int = 0):
    """(model, accuracy on fresh images): `steps` Adam steps on fresh synthetic batches (a few seconds)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = small_cnn()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        images, labels = make_images(64, generator)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    images, labels = make_images(1000, generator)
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    return model, accuracy


def draw(path: str, steps: int = 600):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("the demo picture needs matplotlib: pip install matplotlib") from error
    model, accuracy = train(steps)
    generator = torch.Generator().manual_seed(1)
    images, labels = make_images(256, generator)
    with torch.no_grad():
        correct = model(images).argmax(1) == labels
    # One test image per class, the first the model gets right if any (the titles show the predictions).
    picked = [int(torch.cat([(correct & (labels == label)).nonzero(), (labels == label).nonzero()])[0])
              for label in range(len(CLASSES))]
    images, labels = images[picked], labels[picked]
    # Every class at once: [4 images, 4 classes, 1, SIZE, SIZE], from a black image to the input.
    maps = integrated_gradients(model, images, n_steps=32)[:, :, 0]
    with torch.no_grad():
        probabilities = model(images).softmax(1)
    maps = maps / maps.abs().amax(dim=(1, 2, 3), keepdim=True)  # one scale per input image (row)

    rows, cols = len(images), 1 + len(CLASSES)
    figure, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 1.0, 2.2 * rows + 1.6), squeeze=False)
    for row in range(rows):
        predicted = int(probabilities[row].argmax())
        axes[row, 0].imshow(images[row, 0].numpy(), cmap="gray")
        axes[row, 0].set_ylabel(f"input {row + 1}", fontsize=10)
        axes[row, 0].set_title(f"a {CLASSES[labels[row]]}; model says\n{CLASSES[predicted]} "
                               f"({probabilities[row, predicted]:.0%})", fontsize=9)
        for label in range(len(CLASSES)):
            axis = axes[row, 1 + label]
            heat = axis.imshow(maps[row, label].numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
            axis.set_title(f"class '{CLASSES[label]}'" + ("\n(predicted)" if label == predicted else "\n"),
                           fontsize=9, fontweight="bold" if label == predicted else "normal")
            if label == predicted:
                for spine in axis.spines.values():
                    spine.set(color="green", linewidth=3)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("What each input pixel contributes to every class's score, all classes in one call:\n"
                    "explain.integrated_gradients(model, images)  (red raises the class's score, blue lowers it)\n"
                    f"small CNN trained for {steps} steps on synthetic bars, test accuracy {accuracy:.0%}",
                    fontsize=10)
    figure.tight_layout(rect=(0, 0, 0.9, 0.95))
    bar_axis = figure.add_axes((0.91, 0.12, 0.015, 0.7))
    figure.colorbar(heat, cax=bar_axis, label="contribution (scaled per input)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
