"""One self-contained trainer per objective. The table that maps `recipe.task`
to them, with what each declares, is tuneforge.objectives.OBJECTIVES."""
