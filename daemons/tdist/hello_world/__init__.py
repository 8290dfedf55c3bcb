"""The hello world of the original "Triton Distributed": client -> encoder_decoder -> encoder, decoder."""
