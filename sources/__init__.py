"""Where the training clips come from: synthetic music made from random scores (synth), real
compositions rendered with a General MIDI soundfont (corpus), or a folder of your own audio files
(folder). data.py turns any of them into batches."""
