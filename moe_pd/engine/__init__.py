"""Request execution: the torch-free core (scheduler, sequences), LLMEngine, tokenizers, sampler, offline generation."""
