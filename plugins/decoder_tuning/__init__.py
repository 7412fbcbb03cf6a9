from samflow_plugins.decoder_tuning.plugin import DecoderTuning

__all__ = ["DecoderTuning"]
