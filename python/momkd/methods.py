"""The method registry: every training method, what it needs and where its model lives
(torch-free, so configuration and CLI can use it).

=============  ======================================================  =====  ==========  ======
method         what it is                                              graph  expression  memory
=============  ======================================================  =====  ==========  ======
momkd          MoMKD: GATv2 encoder, class memory, genomics teacher    yes    yes         yes
momkd_histo    MoMKD with every genomics term off (the ablation)       yes    no          yes
abmil          gated-attention MIL (Ilse et al. 2018)                  no     no          no
batchkd        batch-local knowledge distillation from an omics        no     yes         no
               teacher
meanpool       mean of the patch features, linear head or MLP          no     no          no
=============  ======================================================  =====  ==========  ======

Each entry names its model module (``MethodInfo.module``), which provides the hooks that
:mod:`momkd.train.factory` calls:

``params_from_config(cfg, method, d_in, genes) -> dict``
    The model's constructor arguments from a run configuration (stored in checkpoints).
``build(params) -> nn.Module``
    The model from those arguments.
``loss_weights(cfg)`` (optional)
    Loss weights passed to the model's ``loss`` (default: none).
``batch_size(cfg) -> int`` (optional)
    Bags per optimizer step (default: ``train.batch_size``).

Adding a method is one model module with these hooks and one entry in ``_TABLE``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_LR",
    "METHODS",
    "MethodInfo",
    "has_memory",
    "learning_rate",
    "method_info",
    "uses_expression",
    "uses_graph",
]


@dataclass(frozen=True)
class MethodInfo:
    """What a method needs from the data and what it holds.

    Attributes
    ----------
    name : str
    graph : bool
        Its histology encoder reads the k-NN patch graph.
    expression : bool
        It trains with expression (the clinical table's patients need an expression row).
    memory : bool
        It has MoMKD's class memory (k-means initialisation, memory usage, ``momkd explain``).
    description : str
    module : str
        The module holding the model and its registry hooks (see the module docstring).
    lr : float | None
        The method's own learning rate where ``train.lr`` is null (None: ``DEFAULT_LR``).
    """

    name: str
    graph: bool
    expression: bool
    memory: bool
    description: str
    module: str
    lr: float | None = None


_TABLE = (
    MethodInfo(
        "momkd", True, True, True, "MoMKD (genomics-guided class memory)", "momkd.model.momkd"
    ),
    MethodInfo(
        "momkd_histo",
        True,
        False,
        True,
        "MoMKD architecture and memory, genomics terms off",
        "momkd.model.momkd",
    ),
    MethodInfo("abmil", False, False, False, "gated-attention MIL", "momkd.model.abmil"),
    MethodInfo(
        "batchkd",
        False,
        True,
        False,
        "batch-local distillation from an omics teacher",
        "momkd.model.batchkd",
    ),
    # A linear head on bag means needs larger steps than the deep models (docs/RECIPE.md).
    MethodInfo(
        "meanpool",
        False,
        False,
        False,
        "mean of the patch features, linear head",
        "momkd.model.meanpool",
        1e-2,
    ),
)

#: Learning rate of every method without its own where ``train.lr`` is null (docs/RECIPE.md).
DEFAULT_LR = 5e-4

#: Method name -> :class:`MethodInfo`, in the order shown to users.
METHODS: dict[str, MethodInfo] = {m.name: m for m in _TABLE}


def method_info(name: str) -> MethodInfo:
    """The :class:`MethodInfo` of ``name``.

    Raises
    ------
    KeyError
        Unknown method (callers turn it into a ConfigError naming the key).
    """
    return METHODS[name]


def learning_rate(method: str, lr: float | None) -> float:
    """``train.lr`` resolved: the configured value, else the method's own, else ``DEFAULT_LR``."""
    if lr is not None:
        return float(lr)
    own = METHODS[method].lr
    return float(own if own is not None else DEFAULT_LR)


def uses_graph(method: str) -> bool:
    """Whether the method's histology branch needs the k-NN graph."""
    return METHODS[method].graph


def uses_expression(method: str) -> bool:
    """Whether the method trains with expression."""
    return METHODS[method].expression


def has_memory(method: str) -> bool:
    """Whether the method has MoMKD's class memory (initialisation, usage statistics)."""
    return METHODS[method].memory
