"""ConvBN folding: fold-conv-bn{mode=deploy|tune} (see ../shared/reference/passes-math.md section 2)."""
