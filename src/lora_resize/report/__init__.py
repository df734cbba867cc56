"""For people: text (summaries, sd-scripts' verbose lines, the analysis table, JSON), the HTML report with inline
SVG charts, and the PNG curve."""
