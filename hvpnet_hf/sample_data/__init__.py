"""The bundled multimodal sample sets (Twitter-style NER and MNRE-style RE) and their generator, `build`."""
