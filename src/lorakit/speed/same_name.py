"""A subclass that passes for its class: the fast paths swap an instance's class for one of these.

``same_name_subclass(cls, methods, factory)`` is ``cls`` with ``methods`` overridden, under the same name, module and
qualified name (HF Trainer, ``save_pretrained`` and lorakit read ``type(obj).__name__``). Pickle could not find such
a class by reference, so ``__reduce_ex__`` reduces the instance as ``cls`` itself and ``remake`` gives the rebuilt
object ``factory(cls)`` again (``torch.save``/``torch.load`` and ``copy.deepcopy`` keep the fast class).
"""

from __future__ import annotations

from collections.abc import Callable


def same_name_subclass(cls: type, methods: dict, factory: Callable[[type], type]) -> type:
    def __reduce_ex__(self, protocol):
        fast_class = type(self)
        self.__class__ = cls
        try:
            reduced = self.__reduce_ex__(protocol)
        finally:
            self.__class__ = fast_class
        return (remake, (reduced[0], reduced[1], factory)) + tuple(reduced[2:])

    return type(cls.__name__, (cls,), {**methods, "__reduce_ex__": __reduce_ex__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def remake(make, args, factory):
    """Unpickling / deepcopy: build the object as its own class, then give it the fast subclass again."""
    obj = make(*args)
    obj.__class__ = factory(type(obj))
    return obj
