"""Classify images with a job's model.onnx using only onnxruntime, numpy and Pillow.

The preprocessing (size, channels, value range, mean, std) and the class names are read from the
model's own metadata, written there by the export. Usage:

    python examples/classify_onnx.py runs/demo/model.onnx cat.jpg [more.jpg ...]
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def load(model_path):
    """An inference session and the input contract stored in its metadata (JSON values)."""
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    return session, {key: json.loads(value) for key, value in meta.items()}


def preprocess(image, contract):
    """A PIL image -> float32 array 1 x C x S x S, prepared as the network was trained."""
    size = contract["size"]
    image = image.convert(contract["color"])  # "RGB" or "L"
    scale = size / min(image.size)  # shorter side to `size`, then a centre crop
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    lo, hi = contract["value_range"]
    x = np.asarray(image, dtype=np.float32).reshape(size, size, -1) / 255 * (hi - lo) + lo
    x = (x - np.float32(contract["mean"])) / np.float32(contract["std"])
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def classify(session, contract, image_path):
    """(class name, probabilities over the classes) for one image file."""
    with Image.open(image_path) as image:
        x = preprocess(image, contract)
    (logits,) = session.run(["logits"], {"input": x})
    p = np.exp(logits[0] - logits[0].max())
    p /= p.sum()
    return contract["classes"][int(p.argmax())], p


if __name__ == "__main__":
    session, contract = load(sys.argv[1])
    for path in sys.argv[2:]:
        label, probabilities = classify(session, contract, path)
        print(f"{path}\t{label}\t{probabilities.max():.4f}")
