"""genlib: the training code behind the book *Generative Models, Executed*.

Infrastructure rooms (``runtime``, ``data``, ``nets``, ``train``, ``metrics``, ``viz``,
``results``, ``cli``) are shared by the chapter rooms (``imle``, ``gan``, ``energy``,
``dae``, ``flows``), which import infrastructure and never each other.
"""

__version__ = "0.1.0"
