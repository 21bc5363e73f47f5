"""Writing results: BIDS derivatives, deviation maps and HTML reports."""
