"""lmms-eval runs any of its generation tasks with halluguard methods applied::

    lmms-eval --model halluguard \\
      --model_args 'pretrained=llava-hf/llava-1.5-7b-hf,methods=pai+vhr,config={"pai":{"alpha":0.5}}' \\
      --tasks pope_full

The package registers the model ``halluguard`` through the entry-point group ``lmms_eval.models``
(:func:`manifests`); lmms-eval imports :mod:`.model` only when that model is asked for, so
halluguard itself never needs lmms-eval. :mod:`.tasks` writes local tasks on the shipped test
model's world, which run offline.
"""

MODEL_ID = "halluguard"
MODEL_CLASS = "halluguard.integrations.lmms_eval.model.Halluguard"


def manifests():
    """The entry point lmms-eval calls while its model registry initialises (so ``ModelManifest`` is
    imported here, not at module import)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, chat_class_path=MODEL_CLASS)]
