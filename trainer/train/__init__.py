"""Training loops: SFT of the SpeechLM (the objective, the loop, parallel strategies, checkpoints, telemetry)
and GAN training of the codec (`codec`, with its `codec_losses` and `codec_discriminators`)."""
