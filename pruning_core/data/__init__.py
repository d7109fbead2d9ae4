"""Data sets for jobs: a registry of loaders turning a ``DataSpec`` into train and test sets.

``loaders`` holds the registry and the loaders (digits, CIFAR, synthetic, image folders) with their
transforms, ``decoded`` the host-wide cache of decoded images, ``archive`` the checked extraction of
dataset archives.

May import: ``spec``, ``settings``, ``errors``, ``registry``. Nothing about models or training.
"""
