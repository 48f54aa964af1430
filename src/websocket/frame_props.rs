//! Property tests of the frame tracker against a reference parser.
