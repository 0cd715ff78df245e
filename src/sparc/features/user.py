"""Your own extractor as a stream: ``python:package.module:Class[@weights][?key=value&...]``.

``Class`` is a subclass of :class:`sparc.features.base.Extractor` that says which inputs it reads
in a class attribute ``inputs`` (``("image",)``, ``("caption",)`` or both), and whose
``__init__(spec, input, device)`` calls ``super().__init__(spec, input, device)`` and sets
``self.dim`` (and ``self.model``, which is left out when the extractor is sent to the data-loading
workers). It implements ``embed`` and, for images, ``preprocess_image`` (or ``load`` / ``collate``);
``preprocessing()`` goes into the stream's ``meta.json``. The spec's options and weights reach it
as ``spec.options`` (sorted ``(key, value)`` string pairs) and ``spec.weights``.

``package.module`` is imported as Python imports anything: from the installed packages or from
``sys.path``, which for ``python -m sparc`` (and so for every DVC stage) includes the working
directory, the repository root. ``python -m sparc check`` checks the spec's form only (importing
runs your code); the module, the class, its interface and its inputs are checked here, when the
extract stage builds the extractor. docs/models.md has an example, run by
``tests/features/test_user.py``.
"""

from __future__ import annotations

import importlib

from sparc.catalog import ModelSpec
from sparc.features.base import Extractor


def load_user_class(target: str) -> type[Extractor]:
    """The class named by ``package.module:Class``; ValueError when the module cannot be
    imported, has no such class, or the class is not an :class:`Extractor` with ``inputs``."""
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"python: cannot import {module_name!r} ({err}); is it installed or on sys.path?") from err
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"python: module {module_name!r} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Extractor)):
        raise ValueError(f"python: {target} is not a subclass of sparc.features.base.Extractor")
    inputs = getattr(cls, "inputs", None)
    if not isinstance(inputs, (tuple, list, frozenset, set)) or not inputs or not set(inputs) <= {"image", "caption"}:
        raise ValueError(
            f"python: {target} must say what it reads in a class attribute inputs, e.g. inputs = ('image',) "
            f"(values image and caption), got {inputs!r}"
        )
    return cls


def build_user_extractor(spec: ModelSpec, input: str, device: str = "cpu") -> Extractor:
    """Import and instantiate the ``python:`` extractor of ``spec`` for ``input``; ValueError when
    the class cannot read ``input`` or sets no positive integer ``dim``."""
    cls = load_user_class(spec.name)
    if input not in cls.inputs:
        raise ValueError(f"python: {spec.name} reads {' or '.join(sorted(cls.inputs))}, not {input!r}")
    extractor = cls(spec, input=input, device=device)
    dim = getattr(extractor, "dim", None)
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise ValueError(f"python: {spec.name} must set self.dim to a positive int in __init__, got {dim!r}")
    return extractor
