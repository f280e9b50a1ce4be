"""stub"""

from samples.recipe import RecipeList

RECIPES = RecipeList()
