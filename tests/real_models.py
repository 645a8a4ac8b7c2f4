"""The offline models the tests use live with the demo (demo/offline_models.py); this re-exports them."""

from offline_models import llama_batch, load_minilm, minilm_dir, tiny_llama  # noqa: F401
