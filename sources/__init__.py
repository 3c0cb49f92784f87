"""Where the training clips come from: synthetic music made from random scores (synth) and real
compositions rendered with a General MIDI soundfont (corpus). data.py turns either into batches."""
