"""What a job hands back: the exported network, its input contract, its report and its model card.

``export`` writes and loads safetensors + architecture JSON, torch.export, TorchScript and ONNX;
``inference`` makes a trained network ready to deploy (BatchNorm folded, channels_last); ``contract`` is
what to feed the network and what its outputs mean; ``report`` (torch-free: the API serves it) is the
job's report, ``report_plots`` draws its plots, ``report_html`` renders it for a person, ``report_files``
writes them all; ``card`` is ``MODEL_CARD.md``.

May import: ``graph``, ``models``, ``spec``, ``settings``, ``errors``. ``report``, ``report_plots``,
``report_html``, ``card`` and ``contract`` stay torch-free.
"""
