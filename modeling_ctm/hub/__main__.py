"""`python -m modeling_ctm.hub RUN_DIR NAMESPACE/NAME`: publish a run (see `modeling_ctm.hub.publishing`)."""

from .publishing import main


if __name__ == "__main__":
    main()
