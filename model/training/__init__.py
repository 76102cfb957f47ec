"""Training and evaluation: everything that makes and measures a checkpoint, apart from the inference library.

The inference library (``model`` outside this package) never imports from here (``tests/model/test_boundary.py``);
this package imports the library freely. Its dependencies beyond the service's are the ``train`` extra
(``pip install -e ".[train]"``). The commands keep their names as thin entry points in ``model``
(``python -m model.train``, ``model.evaluate``, ``model.index``, ``model.retrieve``, ``model.pseudo_mask``,
``model.shapes.clip_pretrain``).

Importing the package is cheap: nothing is imported from the submodules here.
"""
