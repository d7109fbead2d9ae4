"""The networks a job can start from: the zoo of builders, their weights files and published weights.

``zoo`` registers the CIFAR ResNets, VGG, MobileNetV2, ``tv:`` and ``timm:`` models and plug-ins, loads
weights (safetensors only) and lists the state dict a model expects; ``weights`` converts ``.pt`` files
to safetensors and names mismatched keys; ``pretrained`` finds a library's published weights in its
cache; ``child`` is the torch work the API runs in a child process.

May import: ``spec``, ``settings``, ``errors``, ``registry``.
"""
