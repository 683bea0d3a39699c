"""Re-identification: can a synthetic image be linked to a training patient?"""
