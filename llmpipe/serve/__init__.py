"""Serving: load a trained model with its tokenizer (load.py), sample (sampling.py), stream text (text.py).

Nothing is imported here, so `import llmpipe.serve.sampling` on a bare GPU node does not pull in
sentencepiece or the project registry that `load` needs.
"""
