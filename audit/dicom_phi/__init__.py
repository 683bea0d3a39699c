"""DICOM PHI: does any output file carry identifying header data?"""
