"""Rights requests by mail: which mails ask to exercise a right, and when the answer is due."""

from __future__ import annotations

from datetime import date

import pytest

from maildesk.rules.rights import due_date, rights_request

REQUESTS = [
    ("Demande RGPD", "Bonjour,\nconformément au RGPD, je souhaite exercer mon droit d'accès.",
     "access"),
    ("Mes données", "Pouvez-vous m'envoyer une copie de mes données personnelles ?", "access"),
    ("Départ", "Je quitte la société : merci de supprimer mes données personnelles.", "erasure"),
    ("", "Je demande l'effacement de toutes mes données, au titre du droit à l'oubli.",
     "erasure"),
    ("Erreur de nom", "Mon nom est mal orthographié, merci de rectifier mes données.",
     "rectification"),
    ("Opposition", "Je m'oppose au traitement de mes données à caractère personnel.",
     "objection"),
    ("", "J'exerce mon droit à la limitation du traitement le temps de vérifier.", "restriction"),
    ("GDPR request", "Under the GDPR, please send me a copy of my personal data.", "access"),
    ("Leaving", "Please erase my data from your systems.", "erasure"),
    ("Right to object", "I object to the processing of my personal data.", "objection"),
    ("For your DPO", "Could your DPO tell me what you do with my personal data?", "generic"),
    ("", "I request data portability: right to data portability of my data.", "portability"),
]

ORDINARY = [
    ("Fichier", "Bonjour, comment supprimer le fichier importé par erreur ?"),
    ("Droits", "L'utilisateur n'a pas les droits d'accès au module paie."),
    ("Facture", "Merci pour la rectification de la facture n°12."),
    ("Licences", "Quelle est la limitation du nombre d'utilisateurs de notre contrat ?"),
    ("Module RGPD", "Comment paramétrer le module RGPD pour purger les données personnelles "
                    "des salariés partis ?"),
    ("DPO", "Notre DPO a validé le paramétrage, pouvez-vous activer la fonction ?"),
    ("Delete", "Please delete the attachment I uploaded yesterday."),
    ("Access", "The new HR user needs access rights to the payroll report."),
    ("GDPR", "Does the GDPR module support anonymising employee records?"),
    ("Restrict", "How do I restrict access to the salary report?"),
    ("Opposition", "Le salarié a fait opposition à la saisie sur salaire, où le noter ?"),
]


@pytest.mark.parametrize(("subject", "text", "kind"), REQUESTS)
def test_a_rights_request_is_recognised_with_its_kind(subject: str, text: str,
                                                      kind: str) -> None:
    assert rights_request(subject, text) == kind


@pytest.mark.parametrize(("subject", "text"), ORDINARY)
def test_an_ordinary_support_mail_is_no_rights_request(subject: str, text: str) -> None:
    assert rights_request(subject, text) is None


def test_our_own_footer_quoted_back_is_no_request() -> None:
    reply = ("Merci, c'est réglé.\n\n> Vous disposez des droits d'accès, de rectification, "
             "d'effacement de mes données.\n-- \nVous pouvez exercer vos droits auprès du DPO "
             "concernant mes données personnelles.")
    assert rights_request("Re: [#4] Export", reply) is None
    assert rights_request("Re: [#4] Export", "Merci de supprimer mes données.\n" + reply) == (
        "erasure"
    )


def test_the_right_named_first_is_the_one_asked_for() -> None:
    text = "Je souhaite la suppression de mes données, après avoir reçu la copie de mes données."
    assert rights_request("", text) == "erasure"


@pytest.mark.parametrize(("received", "due"), [
    (date(2027, 1, 31), date(2027, 2, 28)),
    (date(2028, 1, 31), date(2028, 2, 29)),
    (date(2027, 1, 15), date(2027, 2, 15)),
    (date(2027, 3, 31), date(2027, 4, 30)),
    (date(2027, 12, 31), date(2028, 1, 31)),
    (date(2027, 2, 28), date(2027, 3, 28)),
])
def test_the_answer_is_due_one_calendar_month_later(received: date, due: date) -> None:
    assert due_date(received) == due
